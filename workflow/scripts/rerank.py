import json

from attnprog.joblog import log_to
from attnprog.rerank import rerank_head, tokenizer_dir_of

log_to(snakemake.log)
w = snakemake.wildcards
with open(snakemake.input.info) as f:  # json, not attnprog.models: that would import torch into every job
    info = json.load(f)
rerank_head(snakemake.input.candidates, snakemake.input.head_inputs, int(w.layer), int(w.head), snakemake.output[0],
            tokenizer_dir=tokenizer_dir_of(info))
