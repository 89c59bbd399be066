from attnprog.atomic import write_json
from attnprog.joblog import log_to
from attnprog.models import describe_model

log_to(snakemake.log)

converted = snakemake.input.get("converted")
write_json(snakemake.output[0], describe_model(snakemake.wildcards.model, snakemake.params.spec, converted))
