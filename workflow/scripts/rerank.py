from attnprog.joblog import log_to
from attnprog.models import read_info
from attnprog.rerank import rerank_head, tokenizer_dir_of

log_to(snakemake.log)
w = snakemake.wildcards
rerank_head(snakemake.input.candidates, snakemake.input.attention, snakemake.input.examples, int(w.layer),
            int(w.head), snakemake.output[0], tokenizer_dir=tokenizer_dir_of(read_info(snakemake.input.info)))
