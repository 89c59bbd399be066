from attnprog.atomic import write_json
from attnprog.models import describe_model

converted = snakemake.input.get("converted")
write_json(snakemake.output[0], describe_model(snakemake.wildcards.model, snakemake.params.spec, converted))
