from attnprog.explainers.comparison import write_explainer_comparison
from attnprog.joblog import log_to

log_to(snakemake.log)

write_explainer_comparison(snakemake.wildcards.model, snakemake.input.synthesis, snakemake.input.rerank,
                           snakemake.input.programs, snakemake.input.best, snakemake.output[0])
