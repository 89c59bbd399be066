from attnprog.joblog import log_to
from attnprog.qa import summarise_qa

log_to(snakemake.log)
summarise_qa(list(snakemake.input), snakemake.output[0])
