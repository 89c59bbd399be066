from attnprog.joblog import log_to
from attnprog.synthesize import synthesize_head

log_to(snakemake.log)
w = snakemake.wildcards
synthesize_head(snakemake.params.settings, w.model, int(w.layer), int(w.head), snakemake.input.head_inputs,
                snakemake.output[0], snakemake.input.get("features"))
