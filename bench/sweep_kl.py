"""What the sweep's KL to the unmodified model costs: the finished run's held-out text scored for the unmodified
model and the attribution order at each fraction, once as perplexity only (one pass per run, as the sweep
scored before it reported the KL) and once as the sweep scores it now (`score_runs`: perplexity and KL, every
run compared with the unmodified model batch by batch). Alternates the two `--repeats` times and prints each
time and their ratio, and checks that both give the same perplexities.

    PYTHONPATH=src python bench/sweep_kl.py --results results/smollm2-135m --threads 2

Nothing is written into --results.
"""
import time

import numpy as np
import torch

from attnprog.substitute import compute_matrices_once
from attnprog.substitute.orders import read_order
from attnprog.substitute.sweep import (count_for, mean_per_token, next_token_log_probs, padded_batches, perplexity,
                                      score_runs)
from benchdata import finished_run_parser, open_finished_run


def sequence_nlls(model, sequences: list[list[int]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The sweep's scoring before the KL: summed next-token negative log-likelihood and the number of predicted
    tokens, per sequence."""
    device = next(model.parameters()).device
    nll, count = np.zeros(len(sequences)), np.zeros(len(sequences), dtype=np.int64)
    for batch, ids, mask in padded_batches(sequences, batch_size, device):
        with torch.no_grad():
            logp = next_token_log_probs(model, ids, mask).gather(-1, ids[:, 1:, None])[..., 0].cpu()
        valid = mask[:, 1:].bool().cpu()
        nll[batch] = -(logp * valid).sum(1).double().numpy()
        count[batch] = valid.sum(1).numpy()
    return nll, count


def main():
    parser = finished_run_parser(__doc__)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config, run = open_finished_run(args)
    batch_size = config["substitution"]["batch_size"]
    order = read_order(args.results / "substitution/orders.parquet", "attribution")
    sequences = run.eval_sets["heldout"]
    replacements = {("attribution", f): {h: run.programs[h] for h in order[:count_for(f, run.info.n_heads_total,
                                                                                        len(order))]}
                    for f in args.fractions}
    compute_matrices_once(run.programs, [run.strings(ids) for ids in sequences], log=lambda *_: None)
    print(f"held-out: {len(sequences)} sequences, {sum(map(len, sequences))} tokens; "
          f"{1 + len(replacements)} runs; batch size {batch_size}; threads {args.threads}")

    times = {"perplexity only": [], "perplexity and KL": []}
    for _ in range(args.repeats):
        started = time.time()
        old = {}
        for key, heads in [(("unmodified",), {}), *replacements.items()]:
            run.replacer.set_heads(heads)
            old[key] = perplexity(*sequence_nlls(run.model, sequences, batch_size))
        run.replacer.set_heads({})
        times["perplexity only"].append(time.time() - started)
        started = time.time()
        scores, _ = score_runs(run.model, run.replacer, replacements, sequences, batch_size)
        times["perplexity and KL"].append(time.time() - started)
        for key, score in scores.items():
            assert np.isclose(perplexity(score.nll, score.count), old[key], rtol=1e-5), key
    for name, seconds in times.items():
        print(f"{name}: " + " / ".join(f"{s:.1f}s" for s in seconds))
    ratio = np.array(times["perplexity and KL"]) / np.array(times["perplexity only"])
    print("ratio, perplexity and KL / perplexity only: " + " / ".join(f"{r:.3f}" for r in ratio))
    kl = {key: mean_per_token(score.kl, score.count) for key, score in scores.items()}
    print("KL per token: " + ", ".join(f"{key[-1]}: {value:.4f}" for key, value in kl.items()))


if __name__ == "__main__":
    main()
