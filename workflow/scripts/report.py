"""Rule report_model: one model's pages. Rule report: the cross-model index."""
from attnprog import report

if snakemake.rule == "report_model":
    report.write_model_report(snakemake.params.results, snakemake.params.out_dir, snakemake.params.options,
                              name=snakemake.wildcards.model)
else:
    report.write_index(snakemake.params.results, snakemake.output[0], snakemake.params.options)
