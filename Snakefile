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


rule all:
    input:
        final_targets(),
    default_target: True
