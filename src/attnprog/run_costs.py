"""What a run cost, per model and stage, from the benchmark file Snakemake writes for every job.

Every rule names its file with `benchmark_path` (`benchmark:` directive), so the layout is written once:
`benchmarks/{model}/{rule}[/{job}].tsv`, or `benchmarks/_shared/{rule}[/{job}].tsv` for jobs of no one model
(downloads, QA data, the cross-model steps). A file holds Snakemake's record of one job: its wall seconds
(`s`, exact) and its peak resident memory (`max_rss`, MB) as sampled while it ran, after half a second and then
every 30 s: a lower bound, which misses a peak between samples or in a job's last seconds, and is missing for a
job shorter than half a second. (Its CPU seconds are sampled the same way, so they are left out.) The file is
written when the job ends, so its modification time is the job's end.

Usage: python -m attnprog.run_costs [benchmarks] [--model NAME]   (or: make costs)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

ROOT = "benchmarks"
SHARED = "_shared"  # not a model name: those start with a letter or digit (config schema)


def benchmark_path(rule: str, model: str | None = None, job: str | None = None) -> str:
    """The benchmark file of a job of `rule` (a pattern when its arguments hold wildcards)."""
    parts = [ROOT, model or SHARED, rule] + ([job] if job else [])
    return "/".join(parts) + ".tsv"


def read_benchmarks(folder: str | Path = ROOT) -> pd.DataFrame:
    """One row per job: model ("" for shared jobs), rule, job, seconds, max_rss_mb (NaN where not sampled),
    start and end (Unix seconds)."""
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        parts = path.relative_to(folder).with_suffix("").parts
        if len(parts) < 2:
            raise ValueError(f"{path}: not a benchmark file of this workflow (expected {benchmark_path('RULE', 'MODEL')})")
        record = pd.read_csv(path, sep="\t", na_values=["NA", "-"]).iloc[-1]  # a repeated benchmark: the last
        end = path.stat().st_mtime
        rows.append({"model": "" if parts[0] == SHARED else parts[0], "rule": parts[1], "job": "/".join(parts[2:]),
                     "seconds": float(record["s"]), "max_rss_mb": float(record["max_rss"]), "start": end - float(record["s"]), "end": end})
    if not rows:
        raise FileNotFoundError(f"no benchmark files under {folder}: run the workflow first")
    return pd.DataFrame(rows)


def stage_costs(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, rule), in the order the stages started: jobs, wall_s (first start to last end), job_s
    (summed over its jobs), max_rss_mb (the largest sampled peak of any one job)."""
    grouped = jobs.groupby(["model", "rule"], sort=False)
    costs = grouped.agg(jobs=("job", "size"), first_start=("start", "min"), last_end=("end", "max"),
                        job_s=("seconds", "sum"), max_rss_mb=("max_rss_mb", "max"))
    costs["wall_s"] = costs["last_end"] - costs["first_start"]
    costs = costs.sort_values("first_start").reset_index()
    return costs[["model", "rule", "jobs", "wall_s", "job_s", "max_rss_mb", "first_start", "last_end"]]


def format_costs(costs: pd.DataFrame) -> str:
    """The table as text, clock times local, and the whole span of the jobs on the last line."""
    shown = costs.assign(model=costs["model"].replace("", "(shared)"),
                         started=[time.strftime("%H:%M:%S", time.localtime(t)) for t in costs["first_start"]])
    shown = shown.drop(columns=["first_start", "last_end"]).round({"wall_s": 1, "job_s": 1, "max_rss_mb": 0})
    span = costs["last_end"].max() - costs["first_start"].min()
    return f"{shown.to_string(index=False)}\nfirst job start to last job end: {span / 60:.1f} min"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=ROOT)
    parser.add_argument("--model", help="only this model's jobs (and none of the shared ones)")
    args = parser.parse_args(argv)
    jobs = read_benchmarks(args.folder)
    if args.model:
        jobs = jobs[jobs["model"] == args.model]
        if jobs.empty:
            raise SystemExit(f"error: no benchmark files of model '{args.model}' under {args.folder}")
    print(format_costs(stage_costs(jobs)))


if __name__ == "__main__":
    main()
