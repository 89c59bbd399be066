"""Helpers for the operations tests (SLURM, partial reruns, resume): the snakemake command line for a
private work folder, the job list of a dry run, and a check that every result file is whole."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tinyworld import snakemake_cmd  # noqa: F401  (re-exported for the operations tests)

# Rules whose outputs cover every model (the cross-model outputs). Other rules without a {model} wildcard
# (downloads, QA data per task) do not depend on the models.
CROSS_MODEL_RULES = {"all", "report", "transfer"}


def dry_run_jobs(output: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a `snakemake -n` output lists."""
    jobs = []
    for line in output.splitlines():
        if m := re.match(r"\s*(?:local)?(?:rule|checkpoint) (\w+):$", line):
            jobs.append((m.group(1), {}))
        elif (m := re.match(r"\s*wildcards: (.*)$", line)) and jobs:
            jobs[-1][1].update(pair.split("=", 1) for pair in m.group(1).split(", "))
    return jobs


def result_files(workdir: Path) -> dict[str, float]:
    """{path relative to workdir: mtime} of every file under results/."""
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns
            for p in sorted((workdir / "results").rglob("*")) if p.is_file()}


def assert_results_valid(workdir: Path) -> None:
    """Every Parquet file under results/ reads, every JSON file parses, every .npz loads, every program file
    compiles."""
    files = [p for p in (workdir / "results").rglob("*") if p.is_file()]
    assert files, f"no results under {workdir}"
    for path in files:
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                [arrays[key] for key in arrays.files]
        elif path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")
