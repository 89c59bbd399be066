from attnprog.contracts import HeadId
from attnprog.joblog import log_to
from attnprog.synthesize import synthesize_head

log_to(snakemake.log)
w = snakemake.wildcards
features = snakemake.input.get("features")  # absent (empty) for the LLM backends
synthesize_head(snakemake.params.settings, w.model, HeadId(int(w.layer), int(w.head)), snakemake.input.head_inputs,
                snakemake.output[0], features if isinstance(features, str) and features else None)
