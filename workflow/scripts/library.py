import re

from attnprog.joblog import log_to
from attnprog.library import build_library
from attnprog.models import read_info
from attnprog.rerank import tokenizer_dir_of

log_to(snakemake.log)
info = read_info(snakemake.input.info)
heads = [tuple(map(int, re.search(r"L(\d+)H(\d+)$", d).groups())) for d in snakemake.input.synthesis]
out = snakemake.output
build_library(snakemake.wildcards.model, heads, dict(zip(heads, snakemake.input.synthesis)),
              dict(zip(heads, snakemake.input.rerank)), snakemake.input.attention, snakemake.input.examples,
              out.summary.rsplit("/", 1)[0], snakemake.params.settings, tokenizer_dir=tokenizer_dir_of(info),
              is_causal=info.get("is_causal", True))
