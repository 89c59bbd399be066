from attnprog.models import convert_gguf

convert_gguf(snakemake.input[0], snakemake.output[0], snakemake.params.dtype)
