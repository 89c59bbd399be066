from pathlib import Path

from attnprog.contracts import HeadId
from attnprog.joblog import log_to
from attnprog.library import build_library
from attnprog.settings import LibrarySettings

log_to(snakemake.log)
build_library(snakemake.wildcards.model, [HeadId(*h) for h in snakemake.params.heads], snakemake.input.synthesis,
              snakemake.input.rerank, snakemake.input.head_inputs,
              Path(snakemake.output.summary).parent,
              LibrarySettings.from_config(snakemake.params.settings))
