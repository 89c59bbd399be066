from attnprog.joblog import log_to
from attnprog.qa import prepare_task_data

log_to(snakemake.log)
prepare_task_data(snakemake.input[0], snakemake.wildcards.task, snakemake.output[0], snakemake.params.seed)
