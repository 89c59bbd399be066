"""Peak memory of the sweep's scoring: the finished run's first `--batch` held-out sequences scored as one batch
(large, so that the tokens x vocabulary tensors outweigh all else), once as perplexity only and once as the sweep
scores them (`score_runs`: the unmodified model and one run of the attribution order's first quarter, perplexity
and KL). Each way runs in a fresh process; prints the rise of its peak resident memory over what it held before
scoring, in MB and in tensors of one batch's next-token log-probabilities (batch x positions x vocabulary floats).

    PYTHONPATH=src python bench/sweep_memory.py --results results/smollm2-135m [--batch 32]

Nothing is written into --results.
"""
import argparse
import multiprocessing
import resource
from pathlib import Path

from attnprog.config import load_config
from attnprog.models import use_threads
from attnprog.substitute import compute_matrices_once
from attnprog.substitute.orders import read_order
from attnprog.substitute.sweep import count_for, score_runs
from benchdata import finished_run
from sweep_kl import sequence_nlls


def peak_rise(way: str, results: Path, config_path: Path, batch: int, queue) -> None:
    """In a fresh process: score one batch `way` ("perplexity only" or "score_runs"); put (rise in bytes, bytes of
    one log-probabilities tensor) on `queue`."""
    use_threads(1)
    config = load_config(config_path)
    run = finished_run(results, config)
    order = read_order(results / "substitution/orders.parquet", "attribution")
    heads = {h: run.programs[h] for h in order[:count_for(0.25, run.info.n_heads_total, len(order))]}
    sequences = run.eval_sets["heldout"][:batch]
    compute_matrices_once(run.programs, [run.strings(ids) for ids in sequences], log=lambda *_: None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if way == "score_runs":
        score_runs(run.model, run.replacer, {"quarter": heads}, sequences, batch)
    else:
        run.replacer.set_heads(heads)
        sequence_nlls(run.model, sequences, batch)
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # ru_maxrss is in KiB on Linux
    tensor = len(sequences) * (max(map(len, sequences)) - 1) * run.model.config.vocab_size * 4
    queue.put((rise, tensor))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="results/{model} of a finished run")
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    for way in ("perplexity only", "score_runs"):
        queue = spawn.Queue()
        child = spawn.Process(target=peak_rise, args=(way, args.results, args.config, args.batch, queue))
        child.start()
        rise, tensor = queue.get()
        child.join()
        print(f"{way}: peak rises {rise / 2**20:.0f} MB = {rise / tensor:.1f} log-probability tensors "
              f"of {tensor / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
