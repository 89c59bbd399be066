import pandas as pd

from attnprog.joblog import log_to
from attnprog.synthesize import compute_features

log_to(snakemake.log)
compute_features(pd.read_parquet(snakemake.input.examples), snakemake.output[0], n_words=snakemake.params.n_words)
