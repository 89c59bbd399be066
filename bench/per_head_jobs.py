"""Start-up of the per-head jobs (synthesize, rerank): a model has hundreds, so each job's fixed cost counts.

Usage: python bench/per_head_jobs.py [--repeats 7] [--results results/smollm2-135m]
Start-up = a new Python process that imports what the job's script imports, before any work (median of
`--repeats`). For comparison, the same with the import a Snakemake `script:` job would add (`snakemake.script`,
needed to unpickle the `snakemake` object). With --results, also the whole job: the rule's own command on one
head of a finished run, writing to a temporary folder. Last line: `per_head_startup_s: <slowest of the two>`.
"""
import argparse
import json
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


def seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", help="a finished run's results/{model} folder, to time whole jobs too")
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
        from attnprog.config import schema_defaults  # the schema's synthesis section, as the rule passes it

        SYNTHESIS = json.dumps({"backend": "offline", "offline": schema_defaults("synthesis")["offline"]})
        results = Path(args.results)
        head = "L0H0"
        with tempfile.TemporaryDirectory() as tmp:
            commands = {
                "synthesize": [python, str(SCRIPTS / "synthesize.py"), "--model", results.name, "--layer", "0",
                               "--head", "0", "--settings", SYNTHESIS,
                               "--head-inputs", str(results / "synthesis/head_inputs.npz"),
                               "--features", str(results / "synthesis/features.npz"), "--out", f"{tmp}/{head}",
                               "--log", f"{tmp}/s.log"],
                "rerank": [python, str(SCRIPTS / "rerank.py"), "--layer", "0", "--head", "0", "--candidates",
                           str(results / "synthesis" / head), "--head-inputs",
                           str(results / "synthesis/head_inputs.npz"), "--info", str(results / "model/info.json"),
                           "--out", f"{tmp}/{head}.npz", "--log", f"{tmp}/r.log"]}
            for job, command in commands.items():
                print(f"{job}: whole job on {results.name} {head}: {seconds(command, args.repeats):.3f} s")
    print(f"per_head_startup_s: {max(startup.values()):.3f}")


if __name__ == "__main__":
    main()
