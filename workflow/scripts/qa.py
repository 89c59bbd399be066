from pathlib import Path

from attnprog.joblog import log_to
from attnprog.models import read_info
from attnprog.qa import qa_task

log_to(snakemake.log)
qa_task(read_info(snakemake.input.info), snakemake.wildcards.task, Path(snakemake.input.best).parent,
        snakemake.input.data or None, snakemake.params.settings, snakemake.params.noncausal, snakemake.output[0],
        snakemake.params.device)
