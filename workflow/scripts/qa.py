from pathlib import Path

from attnprog.contracts import ModelInfo
from attnprog.joblog import log_to
from attnprog.models import use_threads
from attnprog.qa import QATask, qa_task
from attnprog.settings import QASettings
from attnprog.substitute import LibraryFiles

log_to(snakemake.log)
use_threads(snakemake.threads)
i = snakemake.input
library = LibraryFiles(best=Path(i.best), programs=Path(i.programs), program_dir=Path(i.program_files))
qa_task(ModelInfo.read(i.info), QATask(**snakemake.params.task), library, i.data or None,
        QASettings.from_config(snakemake.params.settings), snakemake.params.noncausal, snakemake.output[0],
        snakemake.params.device, orders_path=i.orders, tuned_dir=i.tuned)
