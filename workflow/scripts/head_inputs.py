from attnprog.joblog import log_to
from attnprog.synthesize import write_head_inputs

log_to(snakemake.log)
write_head_inputs(snakemake.input.attention, snakemake.input.examples, snakemake.output[0])
