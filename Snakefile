# Explaining attention with program synthesis: extract every head's attention, synthesize programs that
# reproduce it, pick each head's best program on held-out data, put programs back into the model.
# Usage: snakemake --cores N [--configfile config/paper.yaml]; see README.md.

# The embedded default, unless the user names a config with --configfile: Snakemake would otherwise merge
# the two, and the default's model would join the user's.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/synthesize.smk"
include: "workflow/rules/rerank.smk"
include: "workflow/rules/library.smk"
include: "workflow/rules/substitute.smk"
include: "workflow/rules/qa.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "results/report/index.html",
    default_target: True
