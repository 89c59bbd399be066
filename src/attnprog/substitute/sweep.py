"""The sweep: which heads each run replaces, perplexity and KL to the unmodified model per run with paired
bootstrap intervals, the single-head costs, and summary.json.

A method is an order in which heads are replaced by their programs (`orders.py`), plus `uniform`: the heads of
the `programs` order replaced by the uniform causal matrix (the paper's baseline). Every run is evaluated on
every evaluation set: `val` (the corpus's val split: what the headline method is chosen on), `heldout`
(held-out text: what is reported) and `test`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..contracts import HeadId, HeadlineMethod, SingleHeadStats, SubstitutionSummary
from .mechanism import HeadReplacer, Replacement, uniform_attention

EVAL_SETS = ("val", "heldout", "test")


@dataclass(frozen=True)
class Run:
    """One forward configuration of the sweep: which heads are replaced, and by what."""

    method: str           # an order's name (programs in that order) or "uniform" (the programs order's heads)
    seed: int | None      # random orders only
    fraction: float
    heads: tuple[HeadId, ...]

    @property
    def key(self) -> tuple:
        """Runs with the same key compute the same thing (fraction 0 of every method; any order at 100%)."""
        if not self.heads:
            return ("unmodified",)
        if self.method == "tuned":  # weights tuned for each fraction's set of heads
            return ("tuned", self.fraction, frozenset(self.heads))
        return ("uniform" if self.method == "uniform" else "programs", frozenset(self.heads))


def count_for(fraction: float, n_heads_total: int, n_available: int) -> int:
    """How many heads a fraction replaces: a fraction of all the model's heads, never more than have a program."""
    return min(round(fraction * n_heads_total), n_available)


def plan_sweep(orders: dict[tuple[str, int | None], list[HeadId]], n_heads_total: int,
               fractions: list[float], uniform: bool = True) -> list[Run]:
    """Every run of the sweep: for each fraction, each order's first heads, and (with `uniform`) the uniform
    matrix on the heads of the `programs` order. `orders` maps (method, seed) to heads in replacement order."""
    runs = []
    for fraction in fractions:
        for (method, seed), order in orders.items():
            runs.append(Run(method, seed, fraction, tuple(order[:count_for(fraction, n_heads_total, len(order))])))
        if uniform:
            order = orders[("programs", None)]
            runs.append(Run("uniform", None, fraction, tuple(order[:count_for(fraction, n_heads_total, len(order))])))
    return runs


def padded_batches(sequences: list[list[int]], batch_size: int, device):
    """(indices, ids, mask) per batch: sequences batched by length, right-padded, with an attention mask."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        length = max(len(sequences[i]) for i in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        yield batch, ids.to(device), mask.to(device)


def next_token_log_probs(model, ids, mask) -> torch.Tensor:
    """Log-probabilities over the vocabulary of each next token, (batch, length - 1, vocabulary), float32: a view,
    cut after the softmax, which on a cut (non-contiguous) input would first copy it."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return torch.log_softmax(logits, dim=-1)[:, :-1]


def token_kl(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """KL(before || after) at each position, from log-probabilities over the vocabulary (last dimension), one
    sequence (first dimension) at a time so that the temporaries are a sequence's, not the batch's."""
    return torch.stack([(b.exp() * (b - a)).sum(-1) for b, a in zip(before, after)])


@dataclass
class SequenceScores:
    """Per sequence of an evaluation set, under one run: summed next-token NLL, summed KL(unmodified ||
    substituted) over the same predicted tokens, and how many tokens were predicted."""
    nll: np.ndarray
    kl: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "SequenceScores":
        return cls(np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64))


def bootstrap_indices(n_sequences: int, n_boot: int, seed: int) -> np.ndarray:
    """Resamples of the sequences (with replacement), shared by all runs so that comparisons are paired."""
    return np.random.default_rng(seed).integers(0, n_sequences, size=(n_boot, n_sequences))


def perplexity(nll: np.ndarray, count: np.ndarray, resamples: np.ndarray | None = None):
    """Token-level perplexity exp(sum NLL / tokens); with resamples, one value per resample."""
    if resamples is None:
        return float(np.exp(nll.sum() / count.sum()))
    return np.exp(nll[resamples].sum(1) / count[resamples].sum(1))


def mean_per_token(values: np.ndarray, count: np.ndarray, resamples: np.ndarray | None = None):
    """Per-sequence sums (e.g. KL) as a mean per predicted token; with resamples, one value per resample."""
    if resamples is None:
        return float(values.sum() / count.sum())
    return values[resamples].sum(1) / count[resamples].sum(1)


UNMODIFIED = ("unmodified",)


def score_runs(model, replacer: HeadReplacer, replacements: dict[tuple, dict[HeadId, Replacement]],
               sequences: list[list[int]], batch_size: int) -> tuple[dict[tuple, SequenceScores], dict[tuple, float]]:
    """Every run (key -> its heads' replacements) on one evaluation set, batch by batch: the unmodified model's
    distributions of a batch are computed once and every run is compared with them while they are in memory
    (holding them for a whole set would take tokens x vocabulary floats). Returns the scores and the seconds
    spent per run."""
    device = next(model.parameters()).device
    scores = {key: SequenceScores.empty(len(sequences)) for key in [UNMODIFIED, *replacements]}
    seconds = dict.fromkeys(scores, 0.0)
    try:
        for batch, ids, mask in padded_batches(sequences, batch_size, device):
            valid, targets = mask[:, 1:].to(torch.float64), ids[:, 1:, None]
            with torch.no_grad():
                started = time.time()
                replacer.set_heads({})
                before = next_token_log_probs(model, ids, mask)
                seconds[UNMODIFIED] += time.time() - started
                for key in scores:
                    started = time.time()
                    if key == UNMODIFIED:
                        after = before
                    else:
                        replacer.set_heads(replacements[key])
                        after = next_token_log_probs(model, ids, mask)
                    score = scores[key]
                    score.nll[batch] = -(after.gather(-1, targets)[..., 0] * valid).sum(1).cpu().numpy()
                    score.kl[batch] = (token_kl(before, after) * valid).sum(1).cpu().numpy()
                    score.count[batch] = valid.sum(1).long().cpu().numpy()
                    seconds[key] += time.time() - started
    finally:
        replacer.set_heads({})
    return scores, seconds


def run_sweep(model, replacer: HeadReplacer, runs: list[Run], programs: dict[HeadId, Replacement],
              eval_sets: dict[str, list[list[int]]], batch_size: int, n_boot: int = 1000, seed: int = 0,
              log=print, tuned: dict[float, dict[HeadId, Replacement]] | None = None) -> pd.DataFrame:
    """Perplexity and KL to the unmodified model of every run on every evaluation set, with 95% intervals from a
    bootstrap over sequences that is paired with the unmodified model (the same resampled sequences for both),
    so the interval of the relative increase is that of the paired difference. The KL is the strict measure of
    faithfulness: perplexity can stay level, or fall, while the substituted model predicts other tokens.

    Returns one row per (run, eval set): method, seed, fraction, n_replaced, split, n_tokens, ppl, ppl_lo, ppl_hi,
    rel_increase, rel_lo, rel_hi, kl, kl_lo, kl_hi (nats per predicted token). `tuned`: per fraction, the
    replacements of the `tuned` method's runs."""
    if UNMODIFIED not in {run.key for run in runs}:
        raise ValueError("the sweep needs fraction 0 (the unmodified model) as its baseline")
    replacements = {}
    for run in runs:
        if run.key == UNMODIFIED or run.key in replacements:
            continue
        if run.method == "uniform":
            replacements[run.key] = {head: uniform_attention for head in run.heads}
        else:
            source = tuned[run.fraction] if run.method == "tuned" else programs
            replacements[run.key] = {head: source[head] for head in run.heads}
    results: dict[str, dict[tuple, SequenceScores]] = {}
    seconds = dict.fromkeys([UNMODIFIED, *replacements], 0.0)
    for split, sequences in eval_sets.items():
        started = time.time()
        results[split], spent = score_runs(model, replacer, replacements, sequences, batch_size)
        seconds = {key: seconds[key] + spent[key] for key in seconds}
        log(f"substitution: {len(seconds)} runs on {split} ({len(sequences)} sequences) in "
            f"{time.time() - started:.1f}s")
    first_of_key = {}
    for run in runs:
        first_of_key.setdefault(run.key, run)
    for run in first_of_key.values():
        log(f"substitution: {run.method:12s} seed={run.seed} fraction={run.fraction:.2f} "
            f"({len(run.heads)} heads) in {seconds[run.key]:.1f}s")

    rows = []
    for split in eval_sets:
        resamples = bootstrap_indices(len(eval_sets[split]), n_boot, seed)
        base = results[split][UNMODIFIED]
        base_ppl, base_boot = perplexity(base.nll, base.count), perplexity(base.nll, base.count, resamples)
        for run in runs:
            score = results[split][run.key]
            ppl, boot = perplexity(score.nll, score.count), perplexity(score.nll, score.count, resamples)
            rel = boot / base_boot - 1
            kl_boot = mean_per_token(score.kl, score.count, resamples)
            rows.append({"method": run.method, "seed": run.seed, "fraction": run.fraction,
                         "n_replaced": len(run.heads), "split": split, "n_tokens": int(score.count.sum()),
                         "ppl": ppl, "ppl_lo": float(np.percentile(boot, 2.5)),
                         "ppl_hi": float(np.percentile(boot, 97.5)), "rel_increase": ppl / base_ppl - 1,
                         "rel_lo": float(np.percentile(rel, 2.5)), "rel_hi": float(np.percentile(rel, 97.5)),
                         "kl": mean_per_token(score.kl, score.count), "kl_lo": float(np.percentile(kl_boot, 2.5)),
                         "kl_hi": float(np.percentile(kl_boot, 97.5))})
    return pd.DataFrame(rows)


def single_head_costs(model, replacer: HeadReplacer, heads: list[HeadId],
                      programs: dict[HeadId, Replacement], sequences: list[list[int]], batch_size: int,
                      estimates: dict[HeadId, float] | None = None, log=print) -> pd.DataFrame:
    """Each head replaced alone by its program, scored as the sweep scores its runs: layer, head, ppl,
    rel_increase, kl (nats per predicted token) and estimated_kl: the attribution order's estimate of that KL
    (`estimates`, nats per token of val; NaN without them), to be compared with the measured kl."""
    replacements = {("single", *head): {head: programs[head]} for head in heads}
    scores, _ = score_runs(model, replacer, replacements, sequences, batch_size)
    base = scores[UNMODIFIED]
    base_ppl = perplexity(base.nll, base.count)
    rows = []
    for key, (layer, head) in zip(replacements, heads):
        score = scores[key]
        ppl = perplexity(score.nll, score.count)
        rows.append({"layer": layer, "head": head, "ppl": ppl, "rel_increase": ppl / base_ppl - 1,
                     "kl": mean_per_token(score.kl, score.count),
                     "estimated_kl": estimates[(layer, head)] if estimates else np.nan})
    log(f"substitution: {len(heads)} heads replaced one at a time")
    return pd.DataFrame(rows, columns=["layer", "head", "ppl", "rel_increase", "kl", "estimated_kl"])


def spread_over_ranking(ranked: list, n: int | None) -> list:
    """`n` items evenly spaced along a ranking (all of them when n is None or large enough)."""
    if n is None or n >= len(ranked):
        return list(ranked)
    return [ranked[i] for i in sorted(set(np.linspace(0, len(ranked) - 1, n).round().astype(int)))]


def fraction_key(fraction: float) -> str:
    return f"{fraction:g}"


BASELINE_METHODS = ("uniform", "random")


def choose_headline(sweep: pd.DataFrame, split: str = "val") -> str:
    """The method whose replacements cost least on `split` (mean log-perplexity ratio over the fractions
    strictly between 0 and 1), among the methods that are not baselines."""
    rows = sweep[(sweep.split == split) & ~sweep.method.isin(BASELINE_METHODS) & (sweep.fraction > 0)
                 & (sweep.fraction < 1)]
    if rows.empty:
        return "programs"
    return rows.assign(cost=np.log1p(rows.rel_increase)).groupby("method").cost.mean().idxmin()


def summarise_sweep(sweep: pd.DataFrame, single: pd.DataFrame, best: pd.DataFrame, model: str,
                    main_split: str, program_failures: int = 0, tuning: dict | None = None) -> SubstitutionSummary:
    """summary.json: baseline perplexity and, per method, the relative perplexity increase and the KL to the
    unmodified model at each fraction (random order: the mean over seeds), with 95% paired bootstrap intervals,
    per evaluation set; the headline method (chosen on val) also under "best"; and the Spearman correlations
    of the heads replaced alone (`single`): test IoU against their perplexity cost and against their KL, and
    the attribution order's estimated KL (val, nothing replaced) against the measured KL. program_failures and
    tuning (the `tuned` method's record) are passed through."""
    from scipy.stats import spearmanr

    def per_split(split):
        table = sweep[sweep.split == split]
        base = table[table.fraction == 0]
        out = {"baseline_ppl": float(base.ppl.iloc[0]), "n_tokens": int(base.n_tokens.iloc[0]),
               "baseline_ppl_interval": [float(base.ppl_lo.iloc[0]), float(base.ppl_hi.iloc[0])],
               "kl": {}, "kl_interval": {}}
        for method, rows in table.groupby("method", sort=False):
            by_fraction = rows.groupby("fraction")
            out[method] = {fraction_key(f): float(r.rel_increase.mean()) for f, r in by_fraction}
            out["kl"][method] = {fraction_key(f): float(r.kl.mean()) for f, r in by_fraction}
            if method != "random":  # one run per fraction: its interval; random: the spread over seeds
                out[f"{method}_interval"] = {fraction_key(f): [float(r.rel_lo.iloc[0]), float(r.rel_hi.iloc[0])]
                                             for f, r in by_fraction}
                out["kl_interval"][method] = {fraction_key(f): [float(r.kl_lo.iloc[0]), float(r.kl_hi.iloc[0])]
                                              for f, r in by_fraction}
            else:
                out["random_range"] = {fraction_key(f): [float(r.rel_increase.min()), float(r.rel_increase.max())]
                                       for f, r in by_fraction}
        return out

    splits = {split: per_split(split) for split in sweep.split.unique()}
    main = splits[main_split]
    headline = choose_headline(sweep) if "val" in splits else "programs"
    n_replaced = sweep[(sweep.method == headline) & (sweep.split == main_split)]
    single_head = None
    if len(single) >= 3:
        merged = single.merge(best[["layer", "head", "val_iou", "test_iou"]], on=["layer", "head"])

        def ranked(x, y):
            rho, p = spearmanr(x, y)
            return {"spearman_rho": float(rho), "p_value": float(p)}

        by_ppl = ranked(merged.test_iou, merged.rel_increase)
        estimated = merged.estimated_kl.notna().all()
        single_head = SingleHeadStats(n_heads=len(merged), iou="test_iou", spearman_rho=by_ppl["spearman_rho"],
                                      p_value=by_ppl["p_value"], iou_kl=ranked(merged.test_iou, merged.kl),
                                      estimated_kl=ranked(merged.estimated_kl, merged.kl) if estimated else None)
    return SubstitutionSummary(
        model=model, split=main_split, baseline_ppl=main["baseline_ppl"], n_tokens=main["n_tokens"],
        baseline_ppl_interval=main["baseline_ppl_interval"],
        best=HeadlineMethod(method=headline, chosen_on="val" if "val" in splits else None,
                            rel_increase=main[headline], interval=main.get(f"{headline}_interval")),
        n_replaced={fraction_key(r.fraction): int(r.n_replaced) for r in n_replaced.itertuples()},
        splits=splits, program_failures=program_failures, single_head=single_head, tuning=tuning)
