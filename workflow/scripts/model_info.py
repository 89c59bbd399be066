from attnprog.joblog import log_to
from attnprog.models import describe_model

log_to(snakemake.log)

converted = snakemake.input.get("converted")
describe_model(snakemake.wildcards.model, snakemake.params.spec, converted).write(snakemake.output[0])
