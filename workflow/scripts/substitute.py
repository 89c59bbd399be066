from pathlib import Path

from attnprog.contracts import ModelInfo
from attnprog.joblog import log_to
from attnprog.models import use_threads
from attnprog.substitute import LibraryFiles, substitution_sweep

log_to(snakemake.log)
use_threads(snakemake.threads)
i, o = snakemake.input, snakemake.output
library = LibraryFiles(best=Path(i.best), programs=Path(i.programs), program_dir=Path(i.program_files))
substitution_sweep(ModelInfo.read(i.info), library, i.examples, i.heldout, snakemake.params.settings, o.sweep,
                   o.single, o.orders, o.summary, snakemake.params.device)
