from attnprog.joblog import log_to
from attnprog.models import convert_gguf

log_to(snakemake.log)

convert_gguf(snakemake.input[0], snakemake.output[0], snakemake.params.dtype)
