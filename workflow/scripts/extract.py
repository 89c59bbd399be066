from attnprog.extract import extract_model
from attnprog.joblog import log_to
from attnprog.models import read_info

log_to(snakemake.log)

extract_model(read_info(snakemake.input.info), snakemake.input.examples, snakemake.output[0],
              snakemake.params.batch_size, snakemake.params.device)
