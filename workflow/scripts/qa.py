from pathlib import Path

from attnprog.contracts import ModelInfo
from attnprog.joblog import log_to
from attnprog.qa import qa_task
from attnprog.substitute import LibraryFiles

log_to(snakemake.log)
i = snakemake.input
library = LibraryFiles(best=Path(i.best), programs=Path(i.programs), program_dir=Path(i.program_files))
qa_task(ModelInfo.read(i.info), snakemake.wildcards.task, library, i.data or None, snakemake.params.settings,
        snakemake.params.noncausal, snakemake.output[0], snakemake.params.device)
