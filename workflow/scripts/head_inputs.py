from attnprog.extract import write_head_inputs
from attnprog.joblog import log_to

log_to(snakemake.log)
write_head_inputs(snakemake.input.attention, snakemake.input.examples, snakemake.output[0],
                  snakemake.input.get("value_grams"))
