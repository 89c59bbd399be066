"""Start-up of the per-head jobs (synthesize, rerank): a model has hundreds, so each job's fixed cost counts.

Usage: python bench/per_head_jobs.py [--repeats 7] [--results results/smollm2-135m [--heads L0H0 ...]
                                     [--config config/config.yaml]]
Start-up = a new Python process that imports what the job's script imports, before any work (median of
`--repeats`). For comparison, the same with the import a Snakemake `script:` job would add (`snakemake.script`,
needed to unpickle the `snakemake` object). With --results, also the whole job: the rule's own command on each
of --heads of a finished run (by default the first head of the first, middle and last layer), with the settings
the rules pass from --config (the config of that run) and one BLAS thread as Snakemake gives a job of one
thread, writing to a temporary folder. Last line: `per_head_startup_s: <slowest of the two>`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
# What each per-head script imports before it does any work (kept in step with the scripts).
IMPORTS = {"synthesize": "import argparse, json; import attnprog.contracts, attnprog.joblog, attnprog.synthesize",
           "rerank": "import argparse; import attnprog.contracts, attnprog.joblog, attnprog.rerank"}


# What Snakemake sets for a shell job of one thread (snakemake/shell.py): without it numpy's BLAS takes every
# core, and on 2 cores a synthesize job runs about twice as long.
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}


def seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=os.environ | ONE_THREAD)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", help="a finished run's results/{model} folder, to time whole jobs too")
    parser.add_argument("--heads", nargs="+", help="heads to time whole jobs on, as L{layer}H{head}")
    parser.add_argument("--config", default="config/config.yaml", help="the config the finished run ran on")
    args = parser.parse_args()

    python = sys.executable
    bare = seconds([python, "-c", "pass"], args.repeats)
    print(f"python interpreter alone: {bare:.3f} s")
    startup = {}
    for job, imports in IMPORTS.items():
        startup[job] = seconds([python, "-c", imports], args.repeats)
        with_snakemake = seconds([python, "-c", imports + "; import snakemake.script"], args.repeats)
        print(f"{job}: start-up {startup[job]:.3f} s (a `script:` job would start in {with_snakemake:.3f} s)")

    if args.results:
        from attnprog.config import load_config, synthesis_settings
        from attnprog.contracts import HeadId, ModelInfo

        config = load_config(args.config)
        synthesis = json.dumps(synthesis_settings(config["synthesis"]), sort_keys=True)  # as the rule passes it
        causal_check = str(config["rerank"]["causal_check_examples"])
        results = Path(args.results)
        n_layers = ModelInfo.read(results / "model/info.json").n_layers
        heads = args.heads or [f"L{layer}H0" for layer in (0, n_layers // 2, n_layers - 1)]
        inputs = str(results / "synthesis/head_inputs.npz")
        with tempfile.TemporaryDirectory() as tmp:
            for name in heads:
                head = HeadId.parse(name)
                where = ["--layer", str(head.layer), "--head", str(head.head)]
                commands = {
                    "synthesize": [python, str(SCRIPTS / "synthesize.py"), "--model", results.name, *where,
                                   "--settings", synthesis, "--head-inputs", inputs,
                                   "--features", str(results / "synthesis/features.npz"), "--out", f"{tmp}/{name}",
                                   "--log", f"{tmp}/s.log"],
                    "rerank": [python, str(SCRIPTS / "rerank.py"), *where, "--candidates", str(results / "synthesis" / name),
                               "--head-inputs", inputs, "--info", str(results / "model/info.json"),
                               "--causal-check-examples", causal_check, "--out", f"{tmp}/{name}.npz",
                               "--log", f"{tmp}/r.log"]}
                for job, command in commands.items():
                    print(f"{job}: whole job on {results.name} {name}: {seconds(command, args.repeats):.3f} s")
    print(f"per_head_startup_s: {max(startup.values()):.3f}")


if __name__ == "__main__":
    main()
