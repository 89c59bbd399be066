"""Rule report_model: one model's pages. Rule report: the cross-model index."""
from pathlib import Path

from attnprog import report
from attnprog.joblog import log_to

log_to(snakemake.log)

if snakemake.rule == "report_model":
    report.write_model_report(Path(snakemake.input.info).parents[1], Path(snakemake.output.overview).parent,
                              snakemake.params.options, name=snakemake.wildcards.model)
else:
    results = [Path(summary).parents[1] for summary in snakemake.input.libraries]  # results/{model}
    report.write_index({folder.name: folder for folder in results}, snakemake.output[0], snakemake.params.options)
