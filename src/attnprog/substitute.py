"""Put programs back into the model: a replacement attention function and the perplexity sweep.

The mechanism is transformers' own extension point for attention: `install(model, ...)` registers
`substituted_attention` under the name "attnprog" and switches the model to it. That function computes the
head's normal probabilities exactly as eager attention does and then, for the chosen heads, overwrites them with
the program's matrix *before* the value mix. A program's matrix is computed from the tokens of the batch that is
actually running (captured by a forward pre-hook), so it works inside lm-eval's padded batches: each example's
matrix is built from its own unpadded tokens and placed at its own positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

ATTENTION_NAME = "attnprog"

# A replacement maps the token strings of one (unpadded) example to its n x n attention matrix.
Replacement = Callable[[list[str]], np.ndarray]


def uniform_attention(tokens: list[str]) -> np.ndarray:
    """The paper's baseline: token i attends equally to tokens 0..i."""
    n = len(tokens)
    return np.tril(np.ones((n, n), dtype=np.float32)) / np.arange(1, n + 1, dtype=np.float32)[:, None]


@dataclass
class HeadReplacer:
    """Which heads to overwrite and with what; attached to every attention module of a model by `install`."""

    token_strings: Callable[[list[int]], list[str]]
    heads: dict[tuple[int, int], Replacement] = field(default_factory=dict)
    # The batch now running, captured by the forward pre-hook; token strings are worked out once per forward.
    input_ids: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    _tokens: list[list[str]] | None = None
    _token_cache: dict[tuple[int, ...], list[str]] = field(default_factory=dict)  # the sweep reruns the same texts

    def set_heads(self, heads: dict[tuple[int, int], Replacement]) -> None:
        self.heads = dict(heads)

    def capture(self, input_ids: torch.Tensor | None, padding_mask: torch.Tensor | None) -> None:
        self.input_ids, self.padding_mask, self._tokens = input_ids, padding_mask, None

    def layer_heads(self, layer: int) -> list[int]:
        return sorted(h for (l, h) in self.heads if l == layer)

    def example_spans(self) -> list[tuple[int, int]]:
        """(start, end) of each example's real tokens in the padded batch (left or right padding)."""
        batch, length = self.input_ids.shape
        if self.padding_mask is None:
            return [(0, length)] * batch
        spans = []
        for row in self.padding_mask.bool():
            real = torch.nonzero(row).flatten()
            start, end = (int(real[0]), int(real[-1]) + 1) if len(real) else (0, 0)
            if int(row[start:end].sum()) != end - start:
                raise ValueError("substitution needs each example's tokens in one contiguous run (left or right padding)")
            spans.append((start, end))
        return spans

    def example_tokens(self) -> list[list[str]]:
        if self._tokens is None:
            self._tokens = []
            for b, (start, end) in enumerate(self.example_spans()):
                ids = tuple(self.input_ids[b, start:end].tolist())
                if ids not in self._token_cache:
                    self._token_cache[ids] = self.token_strings(list(ids))
                self._tokens.append(self._token_cache[ids])
        return self._tokens

    def overwrite(self, layer: int, probs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Return `probs` (batch, heads, q, k) with this layer's chosen heads replaced by their matrices."""
        heads = self.layer_heads(layer)
        if not heads:
            return probs
        if self.input_ids is None:
            raise RuntimeError("substitution saw no input_ids: call the model with input_ids (not inputs_embeds)")
        batch, _, q_len, k_len = probs.shape
        if q_len != k_len or k_len != self.input_ids.shape[1]:
            raise RuntimeError("substitution needs whole-sequence forward passes, not cached decoding (use_cache=False)")
        spans, tokens = self.example_spans(), self.example_tokens()
        new = torch.zeros(batch, len(heads), q_len, k_len, dtype=torch.float32)
        real_rows = torch.zeros(batch, q_len, dtype=torch.bool)
        for b, (start, end) in enumerate(spans):
            real_rows[b, start:end] = True
        for j, head in enumerate(heads):
            for b, ((start, end), matrix) in enumerate(zip(spans, matrices_for(self.heads[(layer, head)], tokens))):
                matrix = np.asarray(matrix, dtype=np.float32)
                if matrix.shape != (end - start, end - start):
                    raise ValueError(f"replacement for L{layer}H{head} returned shape {matrix.shape} "
                                     f"for {end - start} tokens")
                new[b, j, start:end, start:end] = torch.from_numpy(matrix)
        new = mask_and_normalise(new.to(probs.device), visible_keys(attention_mask, batch, q_len, k_len, probs.device))
        head_index = torch.tensor(heads, device=probs.device)
        replaced = torch.where(real_rows.to(probs.device)[:, None, :, None], new.to(probs.dtype), probs[:, head_index])
        probs = probs.clone()
        probs[:, head_index] = replaced
        return probs


def matrices_for(replacement: Replacement, examples: list[list[str]]) -> list[np.ndarray]:
    """One matrix per example; a replacement with `many` (a ProgramRunner) gets the whole batch in one call."""
    if hasattr(replacement, "many"):
        return replacement.many(examples)
    return [replacement(tokens) for tokens in examples]


def visible_keys(attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """(batch, 1, q, k) bool: which keys each query may see under the model's own mask (causal, padding, window)."""
    if attention_mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None].expand(batch, 1, -1, -1)
    mask = attention_mask[..., :k_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def mask_and_normalise(matrix: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Clip negatives, drop what the query may not see, row-normalise; an empty row attends to its first visible key."""
    matrix = matrix.clamp(min=0) * visible
    total = matrix.sum(-1, keepdim=True)
    first_visible = visible & (visible.cumsum(-1) == 1)
    return torch.where(total > 0, matrix / total.clamp(min=1e-30), first_visible.to(matrix.dtype))


def substituted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                          **kwargs):
    """Eager attention (as in transformers' Llama/Gemma/GPT-2 code) with the chosen heads' probabilities replaced."""
    n_rep = query.shape[1] // key.shape[1]  # grouped-query attention: repeat the key/value heads
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    replacer = getattr(module, "attnprog_replacer", None)
    if replacer is not None:
        probs = replacer.overwrite(module.layer_idx, probs, attention_mask)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def _register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, substituted_attention)
    # Without a registered mask function transformers would hand a custom attention function no mask at all.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


def _capture_batch(replacer: HeadReplacer):
    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        replacer.capture(input_ids, kwargs.get("attention_mask"))
    return hook


def install(model, token_strings: Callable[[list[int]], list[str]]) -> HeadReplacer:
    """Switch `model` to the substituting attention function; returns the replacer whose heads you set.

    `token_strings(ids)` turns one example's token ids into the token strings programs read. With no heads set
    the model computes exactly what eager attention computes.
    """
    _register_attention()
    replacer = HeadReplacer(token_strings)
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            module.attnprog_replacer = replacer
    model.register_forward_pre_hook(_capture_batch(replacer), with_kwargs=True)
    model.set_attn_implementation(ATTENTION_NAME)
    return replacer


# ---------------------------------------------------------------------------------------------------------------
# The perplexity sweep


@dataclass(frozen=True)
class Run:
    """One forward configuration of the sweep: which heads are replaced, and by what."""

    method: str  # "programs" (descending val IoU), "uniform" (same heads, uniform matrix), "random" (random order)
    seed: int | None
    fraction: float
    heads: tuple[tuple[int, int], ...]

    @property
    def key(self) -> tuple:
        """Runs with the same key compute the same thing (fraction 0 of every method; random order at 100%)."""
        if not self.heads:
            return ("unmodified",)
        return ("uniform" if self.method == "uniform" else "programs", frozenset(self.heads))


def plan_sweep(ranked_heads: list[tuple[int, int]], n_heads_total: int, fractions: list[float],
               seeds: list[int]) -> list[Run]:
    """Every run of the sweep. A fraction counts all of the model's heads; `ranked_heads` are the heads that have a
    program, best val IoU first (a head without one is never replaced, so high fractions may replace fewer)."""
    runs = []
    for fraction in fractions:
        k = min(round(fraction * n_heads_total), len(ranked_heads))
        runs.append(Run("programs", None, fraction, tuple(ranked_heads[:k])))
        runs.append(Run("uniform", None, fraction, tuple(ranked_heads[:k])))
        for seed in seeds:
            order = [ranked_heads[i] for i in np.random.default_rng(seed).permutation(len(ranked_heads))]
            runs.append(Run("random", seed, fraction, tuple(order[:k])))
    return runs


def sequence_nlls(model, sequences: list[list[int]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token negative log-likelihood and the number of predicted tokens, per sequence.

    Sequences are batched by length and right-padded with an attention mask."""
    device = next(model.parameters()).device
    nll, count = np.zeros(len(sequences)), np.zeros(len(sequences), dtype=np.int64)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        length = max(len(sequences[i]) for i in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
        valid = mask[:, 1:].bool()
        nll[batch] = -(logp * valid).sum(1).double().numpy()
        count[batch] = valid.sum(1).numpy()
    return nll, count


def bootstrap_indices(n_sequences: int, n_boot: int, seed: int) -> np.ndarray:
    """Resamples of the sequences (with replacement), shared by all runs so that comparisons are paired."""
    return np.random.default_rng(seed).integers(0, n_sequences, size=(n_boot, n_sequences))


def perplexity(nll: np.ndarray, count: np.ndarray, resamples: np.ndarray | None = None):
    """Token-level perplexity exp(sum NLL / tokens); with resamples, one value per resample."""
    if resamples is None:
        return float(np.exp(nll.sum() / count.sum()))
    return np.exp(nll[resamples].sum(1) / count[resamples].sum(1))


def run_sweep(model, replacer: HeadReplacer, runs: list[Run], programs: dict[tuple[int, int], Replacement],
              eval_sets: dict[str, list[list[int]]], batch_size: int, n_boot: int = 1000, seed: int = 0,
              log=print) -> "pd.DataFrame":
    """Perplexity of every run on every evaluation set, with paired bootstrap 95% intervals against the baseline.

    Returns one row per (run, eval set): method, seed, fraction, n_replaced, split, n_tokens, ppl, ppl_lo, ppl_hi,
    rel_increase, rel_lo, rel_hi."""
    import time

    import pandas as pd

    results: dict[tuple, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for run in runs:
        if run.key in results:
            continue
        started = time.time()
        replacement = (lambda head: uniform_attention) if run.method == "uniform" else programs.__getitem__
        replacer.set_heads({head: replacement(head) for head in run.heads})
        results[run.key] = {split: sequence_nlls(model, seqs, batch_size) for split, seqs in eval_sets.items()}
        log(f"substitution: {run.method:8s} seed={run.seed} fraction={run.fraction:.2f} "
            f"({len(run.heads)} heads) in {time.time() - started:.1f}s")
    replacer.set_heads({})

    baseline_key = ("unmodified",)
    if baseline_key not in results:
        raise ValueError("the sweep needs fraction 0 (the unmodified model) as its baseline")
    rows = []
    for split in eval_sets:
        resamples = bootstrap_indices(len(eval_sets[split]), n_boot, seed)
        base_nll, base_count = results[baseline_key][split]
        base_ppl, base_boot = perplexity(base_nll, base_count), perplexity(base_nll, base_count, resamples)
        for run in runs:
            nll, count = results[run.key][split]
            ppl, boot = perplexity(nll, count), perplexity(nll, count, resamples)
            rel = boot / base_boot - 1
            rows.append({"method": run.method, "seed": run.seed, "fraction": run.fraction,
                         "n_replaced": len(run.heads), "split": split, "n_tokens": int(count.sum()),
                         "ppl": ppl, "ppl_lo": float(np.percentile(boot, 2.5)),
                         "ppl_hi": float(np.percentile(boot, 97.5)), "rel_increase": ppl / base_ppl - 1,
                         "rel_lo": float(np.percentile(rel, 2.5)), "rel_hi": float(np.percentile(rel, 97.5))})
    return pd.DataFrame(rows)


def single_head_costs(model, replacer: HeadReplacer, heads: list[tuple[int, int]],
                      programs: dict[tuple[int, int], Replacement], sequences: list[list[int]], batch_size: int,
                      log=print) -> "pd.DataFrame":
    """Perplexity when each head alone is replaced by its program: layer, head, ppl, rel_increase."""
    import pandas as pd

    replacer.set_heads({})
    base = perplexity(*sequence_nlls(model, sequences, batch_size))
    rows = []
    for layer, head in heads:
        replacer.set_heads({(layer, head): programs[(layer, head)]})
        ppl = perplexity(*sequence_nlls(model, sequences, batch_size))
        rows.append({"layer": layer, "head": head, "ppl": ppl, "rel_increase": ppl / base - 1})
    replacer.set_heads({})
    log(f"substitution: {len(heads)} heads replaced one at a time")
    return pd.DataFrame(rows, columns=["layer", "head", "ppl", "rel_increase"])


def spread_over_ranking(ranked: list, n: int | None) -> list:
    """`n` items evenly spaced along a ranking (all of them when n is None or large enough)."""
    if n is None or n >= len(ranked):
        return list(ranked)
    return [ranked[i] for i in sorted(set(np.linspace(0, len(ranked) - 1, n).round().astype(int)))]


def fraction_key(fraction: float) -> str:
    return f"{fraction:g}"


def summarise_sweep(sweep: "pd.DataFrame", single: "pd.DataFrame", best: "pd.DataFrame", model: str,
                    main_split: str) -> dict:
    """summary.json: baseline perplexity and, per method, the relative perplexity increase at each fraction
    (random order: the mean over seeds), with 95% bootstrap intervals, per evaluation set; and the Spearman
    correlation between each head's test IoU and the cost of replacing it alone."""
    from scipy.stats import spearmanr

    def per_split(split):
        table = sweep[sweep.split == split]
        base = table[table.fraction == 0]
        out = {"baseline_ppl": float(base.ppl.iloc[0]), "n_tokens": int(base.n_tokens.iloc[0]),
               "baseline_ppl_interval": [float(base.ppl_lo.iloc[0]), float(base.ppl_hi.iloc[0])]}
        for method, rows in table.groupby("method", sort=False):
            by_fraction = rows.groupby("fraction")
            out[method] = {fraction_key(f): float(r.rel_increase.mean()) for f, r in by_fraction}
            if method != "random":  # one run per fraction: its interval; random: the spread over seeds
                out[f"{method}_interval"] = {fraction_key(f): [float(r.rel_lo.iloc[0]), float(r.rel_hi.iloc[0])]
                                             for f, r in by_fraction}
            else:
                out["random_range"] = {fraction_key(f): [float(r.rel_increase.min()), float(r.rel_increase.max())]
                                       for f, r in by_fraction}
        return out

    splits = {split: per_split(split) for split in sweep.split.unique()}
    main = splits[main_split]
    n_replaced = sweep[(sweep.method == "programs") & (sweep.split == main_split)]
    summary = {"model": model, "split": main_split, **main,
               "n_replaced": {fraction_key(r.fraction): int(r.n_replaced) for r in n_replaced.itertuples()},
               "splits": splits}
    if len(single) >= 3:
        merged = single.merge(best[["layer", "head", "val_iou", "test_iou"]], on=["layer", "head"])
        rho, p = spearmanr(merged.test_iou, merged.rel_increase)
        summary["single_head"] = {"n_heads": len(merged), "iou": "test_iou", "spearman_rho": float(rho),
                                  "p_value": float(p)}
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Programs from the library, and the `substitute` rule


class UniformOnFailure:
    """A program runner that, where the program fails on an example, uses the uniform matrix and counts the
    failure: a failing program costs the model what the baseline costs, and never stops the sweep."""

    def __init__(self, runner):
        self.runner, self.failures = runner, 0

    def many(self, examples: list[list[str]]) -> list[np.ndarray]:
        from .programs import ProgramError

        try:
            return self.runner.many(examples)
        except ProgramError:
            out = []
            for tokens in examples:
                try:
                    out.append(self.runner(tokens))
                except ProgramError:
                    self.failures += 1
                    out.append(uniform_attention(tokens))
            return out

    def __call__(self, tokens: list[str]) -> np.ndarray:
        return self.many([tokens])[0]


def read_best(library_dir) -> "pd.DataFrame":
    """best.parquet, heads without a program dropped, best val IoU first."""
    import pandas as pd
    from pathlib import Path

    best = pd.read_parquet(Path(library_dir) / "best.parquet")
    best = best[best.program.notna()]
    return best.sort_values(["val_iou", "layer", "head"], ascending=[False, True, True]).reset_index(drop=True)


def program_replacements(library_dir, best: "pd.DataFrame", tokenizer_dir=None, noncausal: str = "prefixwise",
                         log=print) -> dict[tuple[int, int], UniformOnFailure]:
    """Each head's best program as a cached runner. A program that failed the causality check runs prefix by
    prefix (row i from tokens[:i+1] only) or, with noncausal="skip", its head is never replaced."""
    import dataclasses
    from pathlib import Path

    import pandas as pd

    from . import programs as progs
    from . import runner

    library_dir = Path(library_dir)
    table = pd.read_parquet(library_dir / "programs.parquet").set_index("name")
    loaded = {p.name: p for p in progs.load_programs(library_dir / "programs")}
    runners, out, skipped = {}, {}, 0
    for row in best.itertuples():
        if row.program not in loaded or row.program not in table.index:
            raise ValueError(f"library: best program '{row.program}' of L{row.layer}H{row.head} is not in "
                             f"{library_dir / 'programs'} and programs.parquet")
        causal = bool(table.loc[row.program, "causal"])
        if not causal and noncausal == "skip":
            skipped += 1
            continue
        if row.program not in runners:
            program = dataclasses.replace(loaded[row.program], trusted=bool(table.loc[row.program, "trusted"]))
            runners[row.program] = UniformOnFailure(runner.ProgramRunner(program, prefixwise=not causal,
                                                                        tokenizer_dir=tokenizer_dir))
        out[(int(row.layer), int(row.head))] = runners[row.program]
    n_prefixwise = sum(isinstance(r.runner, runner.ProgramRunner) and r.runner.prefixwise for r in runners.values())
    log(f"substitution: {len(runners)} programs for {len(out)} heads; {n_prefixwise} non-causal programs run "
        f"prefix by prefix; {skipped} heads skipped as non-causal")
    return out


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


def substitution_sweep(info: dict, library_dir, examples_path, heldout_path, settings: dict, sweep_path,
                       single_path, summary_path, device: str = "auto", log=print) -> dict:
    """The `substitute` rule: the perplexity sweep of one model. Writes sweep.parquet (one row per run and
    evaluation set), single_heads.parquet (each measured head replaced alone) and summary.json."""
    from functools import partial

    from .atomic import write_json, write_parquet
    from .data import read_examples, token_strings
    from .models import load_model, load_tokenizer
    from .rerank import tokenizer_dir_of

    if 0 not in settings["fractions"]:
        raise ValueError("substitution.fractions must include 0 (the unmodified model is the baseline)")
    tokenizer, model = load_tokenizer(info), load_model(info, device)
    replacer = install(model, partial(token_strings, tokenizer))
    best = read_best(library_dir)
    programs = program_replacements(library_dir, best, tokenizer_dir_of(info), settings["noncausal"], log)
    ranked = [(int(r.layer), int(r.head)) for r in best.itertuples() if (r.layer, r.head) in programs]

    eval_sets = {"test": [list(ids) for ids in read_examples(examples_path, "test").input_ids],
                 "heldout": capped([list(ids) for ids in read_examples(heldout_path).input_ids],
                                   settings["heldout_tokens"])}
    eval_sets = {name: seqs for name, seqs in eval_sets.items() if seqs}
    runs = plan_sweep(ranked, info["n_layers"] * info["n_heads"], settings["fractions"], settings["random_seeds"])
    sweep = run_sweep(model, replacer, runs, programs, eval_sets, settings["batch_size"], settings["bootstrap"],
                      log=log)
    single_heads = spread_over_ranking(ranked, settings["single_head_count"])
    single = single_head_costs(model, replacer, single_heads, programs, eval_sets[settings["single_head_split"]],
                               settings["batch_size"], log)

    summary = summarise_sweep(sweep, single, best, info["model"], "heldout" if "heldout" in eval_sets else "test")
    summary["program_failures"] = sum(r.failures for r in {id(p): p for p in programs.values()}.values())
    write_parquet(sweep, sweep_path)
    write_parquet(single, single_path)
    write_json(summary_path, summary)
    return summary
