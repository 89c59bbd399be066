"""Can the attribution estimate choose each head's program, not only the order of the heads? The workflow gives
each head the library program with the least val output error, then orders the heads by estimated KL. Here the
same greedy order is built with every library program a candidate for every head: at each of the sweep's
fractions, every remaining head's KL is estimated for every candidate at once (one forward and
`attribution_samples` backward passes on val; a candidate only changes delta = program - attention), and each
head takes its cheapest candidate. Both are then scored at the sweep's fractions: perplexity and KL to the
unmodified model on held-out text, test and val with paired 95% intervals; and the chosen programs' mean test IoU.

    PYTHONPATH=src python bench/attribution_choice.py --results results/smollm2-135m --threads 2 [--top 5] \
        [--samples 8]

Nothing is written into --results. The candidates' matrices are masked with layer 0's attention mask, which
is every layer's in models without sliding-window layers (SmolLM2, Qwen2.5).
"""
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attnprog.contracts import PROGRAMS, SCORES, HeadId
from attnprog.programs import load_programs
from attnprog.runner import ProgramRunner
from attnprog.substitute import compute_matrices_once
from attnprog.substitute.attribution import sampled_gradients
from attnprog.substitute.orders import read_order
from attnprog.substitute.replacements import UniformOnFailure
from attnprog.substitute.sweep import Run, count_for, run_sweep
from benchdata import finished_run_parser, open_finished_run


def library_runners(results: Path, tokenizer_dir, noncausal: str) -> dict[str, UniformOnFailure]:
    """Every library program as a replacement, by name (non-causal ones prefix by prefix, as the workflow runs
    them; with noncausal="skip" they are no candidates)."""
    table = PROGRAMS.read(results / "library/programs.parquet").set_index("name")
    out = {}
    for program in load_programs(results / "library/programs"):
        if program.name not in table.index:
            continue
        causal = bool(table.loc[program.name, "causal"])
        if not causal and noncausal == "skip":
            continue
        program = dataclasses.replace(program, trusted=bool(table.loc[program.name, "trusted"]))
        out[program.name] = UniformOnFailure(ProgramRunner(program, prefixwise=not causal, tokenizer_dir=tokenizer_dir))
    return out


def candidate_kl(model, replacer, replaced: dict, candidates: dict, heads: list, sequences, batch_size: int,
                 samples: int, seed: int = 0) -> np.ndarray:
    """(len(heads), len(candidates)): each head's estimated KL (nats summed over the predicted tokens) with each
    candidate program standing in for it, given the heads in `replaced` already substituted."""
    names = list(candidates)
    fake = {HeadId(0, j): candidates[name] for j, name in enumerate(names)}
    kl = np.zeros((len(heads), len(names)))
    replacer.set_heads(replaced)
    for recorded, draws in sampled_gradients(model, replacer, sequences, batch_size, samples, seed):
        with torch.no_grad():
            probs0, mask0 = recorded[0]
            matrices, real_rows = replacer.replacement_matrices(0, list(range(len(names))), fake, probs0.shape,
                                                                mask0, probs0.device)  # (batch, candidates, q, k)
            rows = real_rows[:, :, None].float()
        for _ in draws:
            with torch.no_grad():
                for i, (layer, head) in enumerate(heads):
                    probs = recorded[layer][0]
                    grad = probs.grad[:, head].float() * rows                       # (batch, q, k)
                    own = (probs[:, head].float() * grad).sum((1, 2))               # (batch,)
                    each = torch.einsum("bcqk,bqk->bc", matrices, grad)             # (batch, candidates)
                    kl[i] += 0.5 * ((each - own[:, None]).double() ** 2).sum(0).numpy() / samples
    replacer.set_heads({})
    return kl


def chosen_order(model, replacer, candidates: dict, allowed: dict, heads: list, counts: list[int], sequences,
                 batch_size: int, samples: int, log=print) -> tuple[list, dict]:
    """The greedy attribution order with each head's program chosen, among its `allowed` candidate names, by
    least estimated KL at the step that picks it (heads left after the last step: by their last estimate)."""
    names = list(candidates)
    order, choice, remaining = [], {}, list(heads)
    for count in sorted({c for c in counts if 0 < c < len(heads)}):
        started = time.time()
        kl = candidate_kl(model, replacer, {h: candidates[choice[h]] for h in order}, candidates, remaining,
                          sequences, batch_size, samples)
        kl[np.array([[name not in allowed[h] for name in names] for h in remaining])] = np.inf
        best = kl.argmin(1)
        cost = kl[np.arange(len(remaining)), best]
        ranked = np.argsort(cost, kind="stable")
        for i in ranked:
            choice[remaining[i]] = names[best[i]]
        n_pick = count - len(order)
        order += [remaining[i] for i in ranked[:n_pick]]
        remaining = [remaining[i] for i in ranked[n_pick:]]
        log(f"step to {len(order)} heads in {time.time() - started:.0f}s")
    return order + remaining, choice


def main():
    parser = finished_run_parser(__doc__)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--top", type=int, default=None,
                        help="each head's candidates: its best this many library programs by val output error "
                             "(default: every library program)")
    parser.add_argument("--samples", type=int, default=None, help="backward passes per step (default: the config's)")
    args = parser.parse_args()
    config, run = open_finished_run(args)
    settings = config["substitution"]
    model, replacer, programs, eval_sets = run.model, run.replacer, run.programs, run.eval_sets
    candidates = library_runners(args.results, run.info.load_path, settings["noncausal"])
    heads = sorted(programs)
    texts = {split: [run.strings(ids) for ids in seqs] for split, seqs in eval_sets.items()}
    started = time.time()
    compute_matrices_once(candidates, texts["val"], log=lambda *_: None)
    print(f"{len(candidates)} candidate programs for {len(heads)} heads; run on val in {time.time() - started:.0f}s")

    scores = SCORES.read(args.results / "library/scores.parquet")
    scores = scores[scores.program.isin(list(candidates))]
    val = scores[scores.split == "val"].sort_values(["layer", "head", "output_error", "program"])
    allowed = {(int(layer), int(head)): set(group.program[: args.top] if args.top else group.program)
               for (layer, head), group in val.groupby(["layer", "head"])}
    counts = {f: count_for(f, run.info.n_heads_total, len(heads)) for f in args.fractions}
    started = time.time()
    order, choice = chosen_order(model, replacer, candidates, allowed, heads, list(counts.values()),
                                 eval_sets["val"], settings["batch_size"],
                                 args.samples or settings["attribution_samples"])
    print(f"order and choice by estimated KL: {time.time() - started:.0f}s; "
          f"{sum(choice[h] != run.best.set_index(['layer', 'head']).program[h] for h in heads)} of {len(heads)} "
          f"heads take another program than the library's choice")
    chosen_programs = {h: candidates[choice[h]] for h in heads}
    workflow = read_order(args.results / "substitution/orders.parquet", "attribution")

    test_iou = scores[scores.split == "test"].set_index(["layer", "head", "program"]).iou
    for name, picked in (("library choice", {h: run.best.set_index(["layer", "head"]).program[h] for h in heads}),
                         ("KL choice", choice)):
        iou = np.array([test_iou.get((h[0], h[1], picked[h]), np.nan) for h in heads])
        print(f"{name}: mean test IoU {np.nanmean(iou):.3f} ({int(np.isnan(iou).sum())} heads unscored)")

    runs = [Run("unmodified", None, 0.0, ())]
    runs += [Run("workflow", None, f, tuple(workflow[:c])) for f, c in counts.items()]
    runs += [Run("KL choice", None, f, tuple(order[:c])) for f, c in counts.items()]
    # run_sweep replaces every method's heads with `programs`: give the KL-choice runs their own mapping
    table = []
    for method, mapping in (("workflow", programs), ("KL choice", chosen_programs)):
        chosen_runs = [r for r in runs if r.method in ("unmodified", method)]
        table.append(run_sweep(model, replacer, chosen_runs, mapping, eval_sets, settings["batch_size"],
                               log=lambda *_: None))
    sweep = pd.concat(table)
    sweep = sweep[sweep.fraction > 0]
    columns = ["split", "fraction", "method", "n_replaced", "rel_increase", "rel_lo", "rel_hi", "kl", "kl_lo", "kl_hi"]
    with pd.option_context("display.width", 220, "display.max_rows", 200, "display.float_format", "{:.4f}".format):
        print(sweep[columns].sort_values(columns[:3]).to_string(index=False))


if __name__ == "__main__":
    main()
