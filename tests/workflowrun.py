"""Helpers for the operations tests (SLURM, partial reruns, resume): the snakemake command line for a
private work folder, the job list of a dry run, and a check that every result file is whole."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

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


# Each Parquet file the workflow writes, by the end of its path, and the contract it is read through.
PARQUET_CONTRACTS = {"data/examples.parquet": "EXAMPLES", "data/heldout.parquet": "EXAMPLES",
                     "library/programs.parquet": "PROGRAMS", "library/scores.parquet": "SCORES",
                     "library/best.parquet": "BEST", "library/baselines.parquet": "BASELINES",
                     "substitution/sweep.parquet": "SWEEP", "substitution/single_heads.parquet": "SINGLE_HEADS",
                     "substitution/orders.parquet": "ORDERS"}
PARQUET_FOLDERS = {"attention": "ATTENTION", "value_grams": "VALUE_GRAMS"}
# Each stage's summary (a JSON record of attnprog.contracts), by the end of its path.
JSON_CONTRACTS = {"model/info.json": "ModelInfo", "library/summary.json": "LibrarySummary",
                  "substitution/summary.json": "SubstitutionSummary", "qa/summary.json": "QASummary"}


def assert_results_valid(workdir: Path) -> None:
    """Every result file reads through its contract (attnprog.contracts: a Parquet file with a wrong schema,
    a stage's summary, rerank result or manifest that breaks its record, a head-inputs file without its splits
    fails), every other JSON file parses, every .npz loads, every program file compiles."""
    from attnprog import contracts

    files = [p for p in (workdir / "results").rglob("*") if p.is_file()]
    assert files, f"no results under {workdir}"
    for path in files:
        where = path.relative_to(workdir / "results").as_posix()
        if path.suffix == ".parquet":
            name = next((c for end, c in PARQUET_CONTRACTS.items() if where.endswith("/" + end)), None)
            name = name or PARQUET_FOLDERS.get(path.parent.name)
            assert name is not None, f"{where}: a Parquet file with no contract"
            getattr(contracts, name).read(path)
        elif path.suffix == ".json" and any(where.endswith("/" + end) for end in JSON_CONTRACTS):
            getattr(contracts, next(c for end, c in JSON_CONTRACTS.items() if where.endswith("/" + end))).read(path)
        elif where.startswith("transfer/") and path.suffix == ".json":
            contracts.TransferSummary.read(path)
        elif path.name == "manifest.json":
            contracts.Manifest.read(path.parent)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.parent.name == "rerank" and path.suffix == ".npz":
            contracts.RerankResult.read(path)
        elif path.name == "head_inputs.npz":
            inputs = contracts.HeadInputs(path)
            for split in contracts.SPLITS:
                inputs.examples(split)
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                [arrays[key] for key in arrays.files]
        elif path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")
