from pathlib import Path

from attnprog.joblog import log_to
from attnprog.models import read_info
from attnprog.substitute import substitution_sweep

log_to(snakemake.log)
substitution_sweep(read_info(snakemake.input.info), Path(snakemake.input.best).parent, snakemake.input.examples,
                   snakemake.input.heldout, snakemake.params.settings, snakemake.output.sweep,
                   snakemake.output.single, snakemake.output.summary, snakemake.params.device)
