"""Substitution: programs put back into the model in place of heads, and what it costs.

    mechanism.py      the replacement attention function (transformers' AttentionInterface)
    replacements.py   each head's library program as a replacement
    orders.py         the orders in which heads are replaced (one per sweep method)
    attribution.py    the attribution order: least estimated KL first, given the heads already replaced
    tuning.py         the `tuned` method: the replaced heads' program weights tuned through the model
    sweep.py          the sweep (perplexity and KL to the unmodified model), intervals, single-head costs, summary
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..contracts import ORDERS, SINGLE_HEADS, SWEEP, ModelInfo, SubstitutionSummary
from ..data import read_examples, token_strings
from ..models import load_model, load_tokenizer
from ..settings import SubstitutionSettings
from .mechanism import HeadReplacer, install, uniform_attention
from .replacements import UniformOnFailure, program_replacements, read_best, tuned_replacements
from . import orders
from .orders import read_headline_order
from .attribution import attribution_order
from .sweep import (count_for, fraction_key, plan_sweep, run_sweep, single_head_costs, spread_over_ranking,
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


@dataclass(frozen=True)
class TuningInputs:
    """What the `tuned` method reads besides the library: the corpus settings and its passages (extra training
    text, cut and filtered by tuning.training_texts), the offline synthesizer's features file (for the tuned
    programs' sentences; None: plainer sentences), and where the tuned programs go."""
    corpus: dict
    passages: object      # an iterable of passage texts (data.passages)
    features: Path | None
    out_dir: Path


def substitution_sweep(info: ModelInfo, library: LibraryFiles, examples_path, heldout_path,
                       settings: SubstitutionSettings, sweep_path, single_path, orders_path, summary_path,
                       device: str, log=print, tuning: TuningInputs | None = None) -> SubstitutionSummary:
    """The `substitute` rule: the perplexity sweep of one model. Writes sweep.parquet (one row per run and
    evaluation set), single_heads.parquet (each measured head replaced alone), orders.parquet (each method's
    head order, the headline marked) and summary.json; with the `tuned` method, the tuned programs under
    tuning.out_dir."""
    if 0 not in settings.fractions:
        raise ValueError("substitution.fractions must include 0 (the unmodified model is the baseline)")
    tokenizer, model = load_tokenizer(info), load_model(info, device)
    token_strings_of = partial(token_strings, tokenizer)
    replacer = install(model, token_strings_of)
    best = read_best(library.best)
    programs = program_replacements(library.program_dir, library.programs, best, info.tokenizer_dir,
                                    settings.noncausal, log)
    eval_sets = evaluation_sets(examples_path, heldout_path, settings.heldout_tokens)
    compute_matrices_once(programs, [token_strings_of(ids) for seqs in eval_sets.values() for ids in seqs], log)

    ranked = orders.iou_order(best, programs)
    methods = settings.methods
    chosen = {("programs", None): ranked}
    estimates = {}
    if "attribution" in methods:
        if "val" not in eval_sets:
            raise ValueError("substitution: the attribution order is chosen on the val split, which is empty")
        counts = [count_for(f, info.n_heads_total, len(ranked)) for f in settings.fractions]
        chosen[("attribution", None)], estimates = attribution_order(
            model, replacer, programs, counts, eval_sets["val"], settings.batch_size,
            settings.attribution_samples, log)
    tuned, summary_tuning = None, None
    if "tuned" in methods:
        if tuning is None:
            raise ValueError("substitution: the tuned method needs its training passages (TuningInputs)")
        tuned, summary_tuning = tuned_method(model, replacer, programs, chosen, info, examples_path, heldout_path,
                                             settings, tuning, tokenizer, token_strings_of, log)
    if "random" in methods:
        chosen.update({("random", seed): orders.random_order(ranked, seed) for seed in settings.random_seeds})
    runs = plan_sweep(chosen, info.n_heads_total, settings.fractions, uniform="uniform" in methods)
    sweep = run_sweep(model, replacer, runs, programs, eval_sets, settings.batch_size, settings.bootstrap,
                      log=log, tuned=tuned)
    single_heads = spread_over_ranking(ranked, settings.single_head_count)
    single = single_head_costs(model, replacer, single_heads, programs, eval_sets[settings.single_head_split],
                               settings.batch_size, estimates, log)

    failures = sum(r.failures for r in {id(p): p for p in programs.values()}.values())
    summary = summarise_sweep(sweep, single, best, info.model, "heldout" if "heldout" in eval_sets else "test",
                              program_failures=failures, tuning=summary_tuning)
    SWEEP.write(sweep, sweep_path)
    SINGLE_HEADS.write(single, single_path)
    ORDERS.write(orders.orders_table(chosen, summary.best.method), orders_path)
    summary.write(summary_path)
    return summary


def tuned_method(model, replacer, programs, chosen, info: ModelInfo, examples_path, heldout_path,
                 settings: SubstitutionSettings,
                 inputs: TuningInputs, tokenizer, token_strings_of, log=print):
    """The `tuned` order (the attribution order, else the IoU order) with each fraction's programs tuned on
    training text only; their files and test IoU written to inputs.out_dir. Adds the order to `chosen`; returns
    the per-fraction replacements for the sweep and what summary.json reports of tuning."""
    from .tuning import training_texts, tune_stages, write_tuned

    started = time.time()
    corpus, tune_settings = inputs.corpus, settings.tuning
    order = chosen.get(("attribution", None), chosen[("programs", None)])
    examples, heldout = read_examples(examples_path), read_examples(heldout_path)
    train = training_texts(examples, heldout, inputs.passages, lambda text: tokenizer(text)["input_ids"],
                           tune_settings.train_tokens, corpus["min_words"], corpus["max_words"],
                           corpus["max_tokens"])
    counts = {f: count_for(f, info.n_heads_total, len(order)) for f in settings.fractions if f > 0}
    sources = {h: r.runner.program.source for h, r in programs.items()
               if hasattr(r, "runner") and not r.runner.prefixwise}
    stages, records = tune_stages(model, replacer, programs, sources, order, counts, train, token_strings_of,
                                  tune_settings, log)
    names = {h: r.runner.program.name for h, r in programs.items() if hasattr(r, "runner")}
    rows = write_tuned(stages, programs, names, info.model, inputs.features,
                       [list(ids) for ids in examples[examples.split == "synth"].input_ids],
                       [list(ids) for ids in examples[examples.split == "test"].input_ids], model, replacer,
                       token_strings_of, settings.batch_size, inputs.out_dir, records)
    chosen[("tuned", None)] = order
    seconds = time.time() - started
    log(f"substitution: tuned method ready in {seconds:.0f}s ({len(train)} training sequences)")
    test_iou = {}
    for fraction in stages:
        mine = [r for r in rows if r["fraction"] == fraction]
        if mine:
            test_iou[fraction_key(fraction)] = {
                "n_heads": len(mine), "untuned": float(np.mean([r["test_iou_untuned"] for r in mine])),
                "tuned": float(np.mean([r["test_iou_tuned"] for r in mine]))}
    return stages, {"stages": records, "test_iou": test_iou, "train_tokens": sum(map(len, train)),
                    "seconds": seconds}
