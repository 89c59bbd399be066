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
            self._tokens = [self.token_strings(self.input_ids[b, s:e].tolist()) for b, (s, e) in
                            enumerate(self.example_spans())]
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
                matrix = np.asarray(self.heads[(layer, head)](tokens[b]), dtype=np.float32)
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
    first_visible = torch.nn.functional.one_hot(visible.to(torch.int8).argmax(-1), matrix.shape[-1]).to(matrix.dtype)
    return torch.where(total > 0, matrix / total.clamp(min=1e-30), first_visible)


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
