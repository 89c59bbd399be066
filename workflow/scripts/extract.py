from attnprog.extract import extract_model
from attnprog.joblog import log_to
from attnprog.contracts import ModelInfo

log_to(snakemake.log)

extract_model(ModelInfo.read(snakemake.input.info), snakemake.input.examples, snakemake.output.attention,
              snakemake.params.batch_size, snakemake.params.device, snakemake.output.get("value_grams"))
