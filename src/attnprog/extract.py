"""Extraction: one batched eager forward pass over a model's examples, every head's attention to Parquet.

Layout (`contracts.ATTENTION`): one file per layer, `layer{L}.parquet`, one row per (example, head) holding
the lower triangle of that head's n x n attention matrix row by row. A file per layer keeps the file count
small (30 for SmolLM2, not 270) while a reader can still fetch one head with a Parquet filter. Memory stays
bounded: batches stream into the writers, and a writer thread turns one batch into Parquet while the model
runs the next.

With the offline synthesizer's output objective, the same forward pass also records every head's value
Gram matrix per example (`ValueGramRecorder`, `contracts.VALUE_GRAMS`, one file per layer in the same
layout): what the output-aware fit (`attnprog.synthesize.output_fit`) weighs attention errors by.

`write_head_inputs` then gathers every head's attention (and Grams) on every split into one file for the
per-head jobs.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from .contracts import ATTENTION, EXAMPLES, SPLITS, VALUE_GRAMS, HeadId, HeadInputs, SplitExamples, Table
from .matrices import tril_indices, triangle_size


def layer_file(out_dir: str | Path, layer: int) -> Path:
    return Path(out_dir) / f"layer{layer}.parquet"


def batches_by_length(examples: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Examples sorted by length and cut into batches, so little compute goes to padding."""
    lengths = examples["input_ids"].map(len)
    ordered = examples.iloc[np.argsort(lengths.to_numpy(), kind="stable")]
    return [ordered.iloc[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def padded_batch(batch: pd.DataFrame, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask: real tokens keep positions 0..n-1, and in a causal model
    their attention rows never see the padding that follows them."""
    lengths = [len(ids) for ids in batch["input_ids"]]
    ids = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (seq, n) in enumerate(zip(batch["input_ids"], lengths)):
        ids[row, :n] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, :n] = 1
    return ids.to(device), mask.to(device)


class _BatchLayout:
    """Where each (example, head) lower triangle sits in a (batch, heads, T, T) attention tensor: one index
    tensor per batch, so each layer's triangles come out in one gather."""

    def __init__(self, example_ids: list[int], lengths: list[int], n_heads: int, width: int, device):
        per_example = []
        for b, n in enumerate(lengths):
            rows, cols = tril_indices(n)
            within = torch.as_tensor(rows * width + cols)
            heads = torch.arange(n_heads)[:, None] * width * width
            per_example.append((b * n_heads * width * width + heads + within[None, :]).reshape(-1))
        self.index = torch.cat(per_example).to(device)
        sizes = np.repeat([triangle_size(n) for n in lengths], n_heads)
        self.offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
        self.columns = [pa.array(np.repeat(example_ids, n_heads), pa.int64()),
                        pa.array(np.tile(np.arange(n_heads), len(lengths)), pa.int32()),
                        pa.array(np.repeat(lengths, n_heads), pa.int32())]

    def record_batch(self, matrices: torch.Tensor, table: Table = ATTENTION) -> pa.RecordBatch:
        """(batch, heads, T, T) attention (or value Grams) -> the batch's rows of `table`."""
        flat = torch.take(matrices, self.index).float().cpu().numpy()
        lists = pa.ListArray.from_arrays(self.offsets, pa.array(flat))
        return pa.RecordBatch.from_arrays([*self.columns, lists], schema=table.schema)


# Architectures whose value vectors are recorded (objective `output`), by how their attention is built.
# Llama-style: separate q/k/v/o projections, grouped-query attention allowed, the value vectors exactly
# v_proj's output (no norm or rotation on them). Tested: llama, gemma3_text (tests/test_extract.py).
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
GPT2_STYLE = ("gpt2",)  # fused c_attn (q, k, v side by side), c_proj


class ValueGramRecorder:
    """Records each head's value Gram matrices during the forward pass that extracts attention.

    Head h's output at token i is sum_j A_ij u_j with u_j = W_O^h v_j: key j's value vector (of h's
    key/value group) through h's slice of the output projection. G = U U^T (T x T per example and head) is
    what an attention error costs in the output: ||(P - A) U||^2 = sum_i d_i^T G d_i. A forward hook on the
    value projection keeps each layer's value vectors; G_jk = v_j^T (W_O^h^T W_O^h) v_k, so the d x d
    matrix per head is formed once and no batch is projected to the model's width."""

    def __init__(self, model):
        config = model.config.get_text_config()
        kind = getattr(config, "model_type", None)
        self.n_heads = config.num_attention_heads
        if kind in LLAMA_STYLE:
            attentions = [layer.self_attn for layer in model.model.layers]
            sources = [a.v_proj for a in attentions]
            # o_proj: y = x W^T, W (width, heads * d); head h reads columns h*d .. (h+1)*d
            out = [a.o_proj.weight.float() for a in attentions]
            slices = [w.reshape(w.shape[0], self.n_heads, -1).permute(1, 2, 0) for w in out]  # (heads, d, width)
        elif kind in GPT2_STYLE:
            attentions = [block.attn for block in model.transformer.h]
            sources = [a.c_attn for a in attentions]
            # Conv1D c_proj: y = x W, W (heads * d, width); head h reads rows h*d .. (h+1)*d
            slices = [a.c_proj.weight.float().reshape(self.n_heads, -1, a.c_proj.weight.shape[1]) for a in attentions]
        else:
            raise ValueError(f"value Grams (synthesis.offline.objective: output) are recorded for Llama-style models "
                             f"({', '.join(LLAMA_STYLE)}) and GPT-2 only, not {type(model).__name__} "
                             f"(model_type {kind!r}); use objective: iou for this model")
        self.kind = kind
        self.metrics = [w @ w.transpose(1, 2) for w in slices]  # (heads, d, d): W_O^h^T W_O^h
        self.head_dim = self.metrics[0].shape[-1]
        self.values: list[torch.Tensor | None] = [None] * len(sources)
        self.hooks = [module.register_forward_hook(self._keeper(layer)) for layer, module in enumerate(sources)]

    def _keeper(self, layer: int):
        def keep(module, args, output):
            self.values[layer] = output
        return keep

    def grams(self, layer: int) -> torch.Tensor:
        """(batch, heads, T, T) float32 Grams of the last forward pass's batch at `layer`."""
        v = self.values[layer].float()
        if self.kind in GPT2_STYLE:  # c_attn's output is [q | k | v]
            v = v[..., 2 * v.shape[-1] // 3:]
        batch, length = v.shape[0], v.shape[1]
        v = v.reshape(batch, length, -1, self.head_dim).transpose(1, 2)  # (batch, kv heads, T, d)
        v = v.repeat_interleave(self.n_heads // v.shape[1], dim=1)       # head h reads kv group h // group size
        return (v @ self.metrics[layer]) @ v.transpose(-1, -2)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


@torch.inference_mode()
def extract_attention(model, examples: pd.DataFrame, out_dir: str | Path, batch_size: int = 8,
                      pad_id: int = 0, progress: bool = True, grams_dir: str | Path | None = None) -> list[Path]:
    """Run `model` over `examples` and write every head's attention, one Parquet file per layer; with
    `grams_dir`, also every head's value Grams (`ValueGramRecorder`), one file per layer there.

    Files are written under temporary names and renamed only when every batch is done, so a killed run
    leaves no file that looks complete. Returns the attention files."""
    n_layers = model.config.get_text_config().num_hidden_layers
    device = next(model.parameters()).device
    stores = [(ATTENTION, Path(out_dir))] + ([(VALUE_GRAMS, Path(grams_dir))] if grams_dir is not None else [])
    recorder = ValueGramRecorder(model) if grams_dir is not None else None
    for _, folder in stores:
        folder.mkdir(parents=True, exist_ok=True)
    tables = [table for table, _ in stores for _ in range(n_layers)]
    finals = [layer_file(folder, layer) for _, folder in stores for layer in range(n_layers)]
    temps = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in finals]
    # Dictionary encoding only for the id columns: tried on attention weights it costs three times the
    # writing time and leaves larger files (few weights repeat).
    writers = [pq.ParquetWriter(tmp, table.schema, use_dictionary=["example_id", "head", "n"])
               for table, tmp in zip(tables, temps)]
    pending = []
    try:
        with ThreadPoolExecutor(max_workers=1) as writer_thread:
            for batch in tqdm(batches_by_length(examples, batch_size), desc="extract", unit="batch",
                              disable=not progress):
                ids, mask = padded_batch(batch, pad_id, device)
                out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
                layout = _BatchLayout(batch["example_id"].tolist(), [len(s) for s in batch["input_ids"]],
                                      out.attentions[0].shape[1], ids.shape[1], device)
                parts = [layout.record_batch(attention) for attention in out.attentions]
                if recorder is not None:
                    parts += [layout.record_batch(recorder.grams(layer), VALUE_GRAMS) for layer in range(n_layers)]
                for future in pending:  # at most one batch waits to be written: memory stays bounded
                    future.result()
                pending = [writer_thread.submit(writer.write_batch, part) for writer, part in zip(writers, parts)]
            for future in pending:
                future.result()
        for writer in writers:
            writer.close()
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        if recorder is not None:
            recorder.close()
        for writer, tmp in zip(writers, temps):
            if writer.is_open:
                writer.close()
            tmp.unlink(missing_ok=True)
    return finals[:n_layers]


def read_attention(path: str | Path, heads: list[int] | None = None, example_ids: list[int] | None = None,
                   table: Table = ATTENTION) -> dict[tuple[int, int], np.ndarray]:
    """Stored attention of a layer file: {(head, example_id): packed lower triangle (float32)}, optionally
    only some heads or examples (read with a Parquet filter). `matrices.unpack` gives the n x n matrix.
    table=VALUE_GRAMS reads a value-Gram layer file the same way (`matrices.unpack_symmetric`)."""
    filters = []
    if heads is not None:
        filters.append(("head", "in", list(heads)))
    if example_ids is not None:
        filters.append(("example_id", "in", list(example_ids)))
    stored = table.read_arrow(path, filters=filters or None)
    lists = stored[table.columns[-1]].combine_chunks()
    values = lists.values.to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()
    return {(int(h), int(e)): values[offsets[k]:offsets[k + 1]]
            for k, (h, e) in enumerate(zip(stored["head"].to_pylist(), stored["example_id"].to_pylist()))}


def layers_in(attention_dir: str | Path) -> list[int]:
    return sorted(int(p.stem[len("layer"):]) for p in Path(attention_dir).glob("layer*.parquet"))


def split_examples(examples: pd.DataFrame, split: str) -> SplitExamples:
    part = examples[examples["split"] == split].sort_values("example_id")
    if part.empty:
        raise ValueError(f"no examples in split '{split}'")
    return SplitExamples([int(e) for e in part["example_id"]], [list(t) for t in part["tokens"]],
                         list(part["text"]))


def _per_head(folder: str | Path, table: Table, parts: dict[str, SplitExamples]) -> dict[tuple[HeadId, str], np.ndarray]:
    """Every head's stored triangles of a per-layer folder, per split, concatenated in example_id order."""
    layers = layers_in(folder)
    if not layers:
        raise ValueError(f"no layer*.parquet files in {folder}")
    out = {}
    for layer in layers:
        stored = read_attention(layer_file(folder, layer), table=table)
        for head in sorted({h for h, _ in stored}):
            for split, part in parts.items():
                flat = []
                for example_id, n in zip(part.example_ids, part.lengths):
                    triangle = stored.get((head, example_id))
                    if triangle is None or len(triangle) != triangle_size(n):
                        raise ValueError(f"{HeadId(layer, head)}: {table.name} for example {example_id} is missing or "
                                         f"not {n} x {n}")
                    flat.append(triangle)
                out[HeadId(layer, head), split] = np.concatenate(flat)
    return out


def write_head_inputs(attention_dir: str | Path, examples_path: str | Path, out_path: str | Path,
                      grams_dir: str | Path | None = None) -> None:
    """The `head_inputs` rule: every split's examples and every head's attention on them in one file
    (`contracts.HeadInputs`), so each per-head job reads one file and imports only numpy; with `grams_dir`
    (the output objective), every head's value Grams too."""
    examples = EXAMPLES.read(examples_path)
    parts = {split: split_examples(examples, split) for split in SPLITS}
    grams = None if grams_dir is None else _per_head(grams_dir, VALUE_GRAMS, parts)
    HeadInputs.write(out_path, parts, _per_head(attention_dir, ATTENTION, parts), grams)


def extract_model(info, examples_path: str | Path, out_dir: str | Path, batch_size: int,
                  device: str = "auto", grams_dir: str | Path | None = None) -> list[Path]:
    """The `extract` rule: load the model and write every head's attention for the corpus examples (and,
    with `grams_dir`, their value Grams)."""
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(info)
    model = load_model(info, device)
    return extract_attention(model, EXAMPLES.read(examples_path), out_dir, batch_size, tokenizer.pad_token_id,
                             grams_dir=grams_dir)
