"""Send a job's output to its Snakemake log file, so concurrent and cluster jobs stay readable."""
from __future__ import annotations

import logging
import sys


def log_to(log_files) -> None:
    """Redirect stdout, stderr (progress bars, warnings, tracebacks) and logging to the job's first log."""
    if not log_files:
        return
    stream = open(log_files[0], "w", buffering=1)
    sys.stdout = sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, force=True)
