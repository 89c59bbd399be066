from pathlib import Path

from attnprog.joblog import log_to
from attnprog.models import read_info, use_threads
from attnprog.qa import QATask, qa_task

log_to(snakemake.log)
use_threads(snakemake.threads)
qa_task(read_info(snakemake.input.info), QATask(**snakemake.params.task), Path(snakemake.input.best).parent,
        snakemake.input.data or None, snakemake.params.settings, snakemake.params.noncausal, snakemake.output[0],
        snakemake.params.device)
