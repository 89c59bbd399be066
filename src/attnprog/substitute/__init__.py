"""Substitution: programs put back into the model in place of heads, and what it costs.

    mechanism.py      the replacement attention function (transformers' AttentionInterface)
    replacements.py   each head's library program as a replacement
    orders.py         the orders in which heads are replaced (one per sweep method)
    attribution.py    the attribution order: least estimated KL first, given the heads already replaced
    sweep.py          the perplexity sweep, its intervals, the single-head costs, summary.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..atomic import write_json
from ..contracts import ORDERS, SINGLE_HEADS, SWEEP, ModelInfo
from ..data import read_examples, token_strings
from ..models import load_model, load_tokenizer
from .mechanism import HeadReplacer, install, uniform_attention
from .replacements import UniformOnFailure, program_replacements, read_best
from . import orders
from .orders import read_headline_order
from .attribution import attribution_order
from .sweep import (count_for, plan_sweep, run_sweep, single_head_costs, spread_over_ranking,
                    summarise_sweep)


@dataclass(frozen=True)
class LibraryFiles:
    """The library files substitution reads (the rules name each)."""
    best: Path          # library/best.parquet
    programs: Path      # library/programs.parquet
    program_dir: Path   # library/programs/


def capped(sequences: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The first sequences, up to max_tokens tokens in all (all of them when None)."""
    if max_tokens is None:
        return sequences
    out, total = [], 0
    for seq in sequences:
        if total >= max_tokens:
            break
        out.append(seq)
        total += len(seq)
    return out


def evaluation_sets(examples_path, heldout_path, heldout_tokens: int | None) -> dict[str, list[list[int]]]:
    """Token ids per evaluation set: `val` (choosing), `heldout` (reporting: up to heldout_tokens), `test`."""
    sets = {"val": [list(ids) for ids in read_examples(examples_path, "val").input_ids],
            "heldout": capped([list(ids) for ids in read_examples(heldout_path).input_ids], heldout_tokens),
            "test": [list(ids) for ids in read_examples(examples_path, "test").input_ids]}
    return {name: seqs for name, seqs in sets.items() if seqs}


def compute_matrices_once(programs: dict, sequences: list[list[str]], log=print) -> None:
    """Run every program once on every evaluation sequence before the sweep: a program's matrix for a text does
    not depend on the fraction or the method, and each runner keeps what it computed for every later run."""
    started = time.time()
    for runner in {id(r): r for r in programs.values()}.values():
        runner.many(sequences)
    log(f"substitution: {len(set(map(id, programs.values())))} programs run on {len(sequences)} sequences "
        f"in {time.time() - started:.1f}s")


def substitution_sweep(info: ModelInfo, library: LibraryFiles, examples_path, heldout_path, settings: dict,
                       sweep_path, single_path, orders_path, summary_path, device: str = "auto", log=print) -> dict:
    """The `substitute` rule: the perplexity sweep of one model. Writes sweep.parquet (one row per run and
    evaluation set), single_heads.parquet (each measured head replaced alone), orders.parquet (each method's
    head order, the headline marked) and summary.json."""
    if 0 not in settings["fractions"]:
        raise ValueError("substitution.fractions must include 0 (the unmodified model is the baseline)")
    tokenizer, model = load_tokenizer(info), load_model(info, device)
    token_strings_of = partial(token_strings, tokenizer)
    replacer = install(model, token_strings_of)
    best = read_best(library.best)
    programs = program_replacements(library.program_dir, library.programs, best, info.tokenizer_dir,
                                    settings["noncausal"], log)
    eval_sets = evaluation_sets(examples_path, heldout_path, settings["heldout_tokens"])
    compute_matrices_once(programs, [token_strings_of(ids) for seqs in eval_sets.values() for ids in seqs], log)

    ranked = orders.iou_order(best, programs)
    methods = settings["methods"]
    chosen = {("programs", None): ranked}
    estimates = {}
    if "attribution" in methods:
        if "val" not in eval_sets:
            raise ValueError("substitution: the attribution order is chosen on the val split, which is empty")
        counts = [count_for(f, info.n_heads_total, len(ranked)) for f in settings["fractions"]]
        chosen[("attribution", None)], estimates = attribution_order(
            model, replacer, programs, counts, eval_sets["val"], settings["batch_size"],
            settings["attribution_samples"], log)
    if "random" in methods:
        chosen.update({("random", seed): orders.random_order(ranked, seed) for seed in settings["random_seeds"]})
    runs = plan_sweep(chosen, info.n_heads_total, settings["fractions"], uniform="uniform" in methods)
    sweep = run_sweep(model, replacer, runs, programs, eval_sets, settings["batch_size"], settings["bootstrap"],
                      log=log)
    single_heads = spread_over_ranking(ranked, settings["single_head_count"])
    single = single_head_costs(model, replacer, single_heads, programs, eval_sets[settings["single_head_split"]],
                               settings["batch_size"], log)

    summary = summarise_sweep(sweep, single, best, info.model, "heldout" if "heldout" in eval_sets else "test",
                              estimates)
    summary["program_failures"] = sum(r.failures for r in {id(p): p for p in programs.values()}.values())
    SWEEP.write(sweep, sweep_path)
    SINGLE_HEADS.write(single, single_path)
    ORDERS.write(orders.orders_table(chosen, summary["best"]["method"]), orders_path)
    write_json(summary_path, summary)
    return summary
