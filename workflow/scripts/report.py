"""Rule report_model: one model's pages. Rule report: the cross-model index."""
from attnprog import report
from attnprog.joblog import log_to

log_to(snakemake.log)

if snakemake.rule == "report_model":
    report.write_model_report(snakemake.params.results, snakemake.params.out_dir, snakemake.params.options,
                              name=snakemake.wildcards.model)
else:
    report.write_index(snakemake.params.results, snakemake.output[0], snakemake.params.options)
