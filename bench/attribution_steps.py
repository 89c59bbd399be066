"""Does the attribution order gain from re-estimating more often? The workflow re-estimates every remaining head's
KL at the sweep's fractions only (10 / 25 / 50%: three steps). This builds the same greedy order on val with a
re-estimate every `--step` of the heads (e.g. 0.05: ten steps up to 50%), and scores both orders at the sweep's
fractions, untuned programs: perplexity and KL to the unmodified model on held-out text, test and val with
paired 95% intervals, and how many heads each order shares with the workflow's.

    PYTHONPATH=src python bench/attribution_steps.py --results results/smollm2-135m --step 0.05 --threads 2

Nothing is written into --results.
"""
import time

import numpy as np
import pandas as pd

from attnprog.substitute.attribution import attribution_order
from attnprog.substitute.orders import read_order
from attnprog.substitute.sweep import Run, count_for, run_sweep
from benchdata import finished_run_parser, open_finished_run


def main():
    parser = finished_run_parser(__doc__)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--step", type=float, default=0.05, help="re-estimate after every this fraction of heads")
    args = parser.parse_args()
    config, run = open_finished_run(args)
    settings = config["substitution"]
    model, replacer, programs, eval_sets = run.model, run.replacer, run.programs, run.eval_sets
    counts = {f: count_for(f, run.info.n_heads_total, len(programs)) for f in args.fractions}
    steps = sorted({count_for(f, run.info.n_heads_total, len(programs))
                    for f in np.arange(args.step, max(args.fractions) + 1e-9, args.step)} | set(counts.values()))
    chosen = {"workflow (3 steps)": read_order(args.results / "substitution/orders.parquet", "attribution")}
    started = time.time()
    finer = f"every {args.step:g} ({len(steps)} steps)"
    chosen[finer], _ = attribution_order(model, replacer, programs, steps, eval_sets["val"], settings["batch_size"],
                                         settings["attribution_samples"], log=lambda *_: None)
    print(f"order re-estimated at {steps} heads: {time.time() - started:.0f}s")

    runs = [Run("unmodified", None, 0.0, ())] + [Run(name, None, f, tuple(order[:c]))
                                                 for name, order in chosen.items() for f, c in counts.items()]
    sweep = run_sweep(model, replacer, runs, programs, eval_sets, settings["batch_size"], log=lambda *_: None)
    sweep = sweep[sweep.fraction > 0].rename(columns={"method": "order"})
    workflow = chosen["workflow (3 steps)"]
    sweep["shared"] = [len(set(chosen[m][:counts[f]]) & set(workflow[:counts[f]]))
                       for m, f in zip(sweep["order"], sweep.fraction)]
    columns = ["split", "fraction", "order", "n_replaced", "shared", "rel_increase", "rel_lo", "rel_hi", "kl",
               "kl_lo", "kl_hi"]
    with pd.option_context("display.width", 220, "display.max_rows", 200, "display.float_format", "{:.4f}".format):
        print(sweep[columns].sort_values(columns[:3]).to_string(index=False))


if __name__ == "__main__":
    main()
