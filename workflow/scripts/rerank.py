from attnprog.contracts import HeadId, ModelInfo
from attnprog.joblog import log_to
from attnprog.rerank import rerank_head

log_to(snakemake.log)
info = ModelInfo.read(snakemake.input.info)
rerank_head(snakemake.input.candidates, snakemake.input.head_inputs,
            HeadId(int(snakemake.wildcards.layer), int(snakemake.wildcards.head)), snakemake.output.table,
            snakemake.output.outputs, tokenizer_dir=info.tokenizer_dir, is_causal=info.is_causal,
            causal_check_examples=snakemake.params.causal_check_examples)
