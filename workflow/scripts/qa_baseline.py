from attnprog.contracts import ModelInfo
from attnprog.joblog import log_to
from attnprog.models import use_threads
from attnprog.qa import QATask, qa_baseline

log_to(snakemake.log)
use_threads(snakemake.threads)
p = snakemake.params
qa_baseline(ModelInfo.read(snakemake.input.info), QATask(**p.task), snakemake.input.data or None, p.questions,
            p.batch_size, snakemake.output[0], p.device)
