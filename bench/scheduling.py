"""Snakemake's own cost of scheduling many short jobs, with its defaults and with the two settings the workflow
profile sets (`max-jobs-per-timespan`, `scheduler-subsample`, read from profiles/default/config.yaml).

A toy workflow in a temporary folder: N jobs that sleep, each followed by a second one, as the per-head
synthesize and rerank jobs are, on 2 cores. Sleeping jobs leave the cores to Snakemake, so its own CPU and the
wall time beyond the jobs' sleep are what is measured. Each variant runs in a fresh process; last line
`snakemake_cpu_ratio: <profile / defaults>`.

    python bench/scheduling.py [--jobs 300] [--sleep 0.2] [--cores 2]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("max-jobs-per-timespan", "scheduler-subsample")

SNAKEFILE = """
rule all:
    input: expand("second/{{i}}", i=range({jobs}))
rule first:
    output: "first/{{i}}"
    shell: "sleep {sleep} && touch {{output}}"
rule second:
    input: "first/{{i}}"
    output: "second/{{i}}"
    shell: "sleep {sleep} && touch {{output}}"
"""

# Runs Snakemake's command line in this process and prints the process's own CPU seconds (its jobs are children).
MEASURED = """
import resource, sys
from snakemake.cli import main
sys.argv = ["snakemake"] + sys.argv[1:]
try:
    main()
finally:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"own_cpu_s {usage.ru_utime + usage.ru_stime:.2f}", file=sys.stderr)
"""


def profile_flags() -> list[str]:
    profile = yaml.safe_load((ROOT / "profiles/default/config.yaml").read_text())
    return [arg for key in SETTINGS for arg in (f"--{key}", str(profile[key]))]


def run(folder: Path, cores: int, flags: list[str]) -> tuple[float, float]:
    """(wall seconds, Snakemake's own CPU seconds) of one run of the toy workflow from scratch."""
    for name in ("first", "second", ".snakemake"):
        shutil.rmtree(folder / name, ignore_errors=True)
    started = time.time()
    done = subprocess.run([sys.executable, "-c", MEASURED, "--cores", str(cores), "--quiet", "all", *flags],
                          cwd=folder, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{done.stderr[-2000:]}")
    own = [line for line in done.stderr.splitlines() if line.startswith("own_cpu_s ")]
    return wall, float(own[-1].split()[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="pairs of jobs (the default run has 270)")
    parser.add_argument("--sleep", type=float, default=0.2, help="seconds each job sleeps")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    flags = profile_flags()
    jobs_alone = 2 * args.jobs * args.sleep / args.cores
    print(f"{2 * args.jobs} jobs of {args.sleep} s on {args.cores} cores: {jobs_alone:.0f} s of sleep per core")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "Snakefile").write_text(SNAKEFILE.format(jobs=args.jobs, sleep=args.sleep))
        for name, extra in (("defaults", []), ("profile", flags)):
            wall, own = run(folder, args.cores, extra)
            results[name] = own
            print(f"{name:8s} {' '.join(extra) or '(Snakemake defaults)':60s} wall {wall:6.1f} s   "
                  f"Snakemake's own CPU {own:6.1f} s")
    print(f"snakemake_cpu_ratio: {results['profile'] / results['defaults']:.3f}")


if __name__ == "__main__":
    main()
