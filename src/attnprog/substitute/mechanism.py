"""Putting programs back into the model: a replacement attention function.

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

from ..contracts import HeadId
from ..matrices import uniform

ATTENTION_NAME = "attnprog"

# A replacement maps the token strings of one (unpadded) example to its n x n attention matrix.
Replacement = Callable[[list[str]], np.ndarray]


def uniform_attention(tokens: list[str]) -> np.ndarray:
    """The paper's baseline: token i attends equally to tokens 0..i."""
    return uniform(len(tokens))


@dataclass
class HeadReplacer:
    """Which heads to overwrite and with what; attached to every attention module of a model by `install`."""

    token_strings: Callable[[list[int]], list[str]]
    heads: dict[HeadId, Replacement] = field(default_factory=dict)
    # The batch now running, captured by the forward pre-hook; token strings are worked out once per forward.
    input_ids: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    _tokens: list[list[str]] | None = None
    _token_cache: dict[tuple[int, ...], list[str]] = field(default_factory=dict)  # the sweep reruns the same texts
    # With `recording` on, each layer's probabilities as used (gradients retained) and its attention mask, for
    # attribution (attribution.py).
    recording: bool = False
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def set_heads(self, heads: dict[HeadId, Replacement]) -> None:
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
        new, real_rows = self.replacement_matrices(layer, heads, self.heads, probs.shape, attention_mask,
                                                   probs.device)
        head_index = torch.tensor(heads, device=probs.device)
        replaced = torch.where(real_rows[:, None, :, None], new.to(probs.dtype), probs[:, head_index])
        probs = probs.clone()
        probs[:, head_index] = replaced
        return probs

    def replacement_matrices(self, layer: int, heads: list[int], replacements: dict[HeadId, Replacement],
                             shape: torch.Size, attention_mask: torch.Tensor | None, device
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(matrices, real_rows) for the running batch: (batch, len(heads), q, k) float32, each head's replacement
        masked as the model masks and row-normalised, and (batch, q) bool, the rows of real (unpadded) tokens."""
        if self.input_ids is None:
            raise RuntimeError("substitution saw no input_ids: call the model with input_ids (not inputs_embeds)")
        batch, _, q_len, k_len = shape
        if q_len != k_len or k_len != self.input_ids.shape[1]:
            raise RuntimeError("substitution needs whole-sequence forward passes, not cached decoding (use_cache=False)")
        spans, tokens = self.example_spans(), self.example_tokens()
        new = torch.zeros(batch, len(heads), q_len, k_len, dtype=torch.float32)
        real_rows = torch.zeros(batch, q_len, dtype=torch.bool)
        for b, (start, end) in enumerate(spans):
            real_rows[b, start:end] = True
        for j, head in enumerate(heads):
            for b, ((start, end), matrix) in enumerate(zip(spans, matrices_for(replacements[(layer, head)], tokens))):
                # a tensor (substitute.tuning's programs) keeps its gradient through to the model's output
                matrix = matrix.float() if torch.is_tensor(matrix) else torch.from_numpy(np.asarray(matrix, np.float32))
                if tuple(matrix.shape) != (end - start, end - start):
                    raise ValueError(f"replacement for {HeadId(layer, head)} returned shape {matrix.shape} "
                                     f"for {end - start} tokens")
                new[b, j, start:end, start:end] = matrix
        new = mask_and_normalise(new.to(device), visible_keys(attention_mask, batch, q_len, k_len, device))
        return new, real_rows.to(device)


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
        if replacer.recording and probs.requires_grad:
            probs.retain_grad()
            replacer.recorded[module.layer_idx] = (probs, attention_mask)
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
