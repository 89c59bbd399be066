"""Extraction: one batched eager forward pass over a model's examples, every head's attention to Parquet.

Layout (`contracts.ATTENTION`): one file per layer, `layer{L}.parquet`, one row per (example, head) holding
the lower triangle of that head's n x n attention matrix row by row. A file per layer keeps the file count
small (30 for SmolLM2, not 270) while a reader can still fetch one head with a Parquet filter. Memory stays
bounded: batches stream into the writers, and a writer thread turns one batch into Parquet while the model
runs the next.

`write_head_inputs` then gathers every head's attention on every split into one file for the per-head jobs.
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

from .contracts import ATTENTION, EXAMPLES, SPLITS, HeadId, HeadInputs, SplitExamples
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

    def record_batch(self, attention: torch.Tensor) -> pa.RecordBatch:
        flat = torch.take(attention, self.index).float().cpu().numpy()
        lists = pa.ListArray.from_arrays(self.offsets, pa.array(flat))
        return pa.RecordBatch.from_arrays([*self.columns, lists], schema=ATTENTION.schema)


@torch.inference_mode()
def extract_attention(model, examples: pd.DataFrame, out_dir: str | Path, batch_size: int = 8,
                      pad_id: int = 0, progress: bool = True) -> list[Path]:
    """Run `model` over `examples` and write every head's attention, one Parquet file per layer.

    Files are written under temporary names and renamed only when every batch is done, so a killed run
    leaves no file that looks complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layers = model.config.get_text_config().num_hidden_layers
    device = next(model.parameters()).device
    finals = [layer_file(out_dir, layer) for layer in range(n_layers)]
    temps = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in finals]
    # Dictionary encoding only for the id columns: tried on attention weights it costs three times the
    # writing time and leaves larger files (few weights repeat).
    writers = [pq.ParquetWriter(tmp, ATTENTION.schema, use_dictionary=["example_id", "head", "n"]) for tmp in temps]
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
        for writer, tmp in zip(writers, temps):
            if writer.is_open:
                writer.close()
            tmp.unlink(missing_ok=True)
    return finals


def read_attention(path: str | Path, heads: list[int] | None = None, example_ids: list[int] | None = None
                   ) -> dict[tuple[int, int], np.ndarray]:
    """Stored attention of a layer file: {(head, example_id): packed lower triangle (float32)}, optionally
    only some heads or examples (read with a Parquet filter). `matrices.unpack` gives the n x n matrix."""
    filters = []
    if heads is not None:
        filters.append(("head", "in", list(heads)))
    if example_ids is not None:
        filters.append(("example_id", "in", list(example_ids)))
    table = ATTENTION.read_arrow(path, filters=filters or None)
    lists = table["attention"].combine_chunks()
    values = lists.values.to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()
    return {(int(h), int(e)): values[offsets[k]:offsets[k + 1]]
            for k, (h, e) in enumerate(zip(table["head"].to_pylist(), table["example_id"].to_pylist()))}


def layers_in(attention_dir: str | Path) -> list[int]:
    return sorted(int(p.stem[len("layer"):]) for p in Path(attention_dir).glob("layer*.parquet"))


def split_examples(examples: pd.DataFrame, split: str) -> SplitExamples:
    part = examples[examples["split"] == split].sort_values("example_id")
    if part.empty:
        raise ValueError(f"no examples in split '{split}'")
    return SplitExamples([int(e) for e in part["example_id"]], [list(t) for t in part["tokens"]],
                         list(part["text"]))


def write_head_inputs(attention_dir: str | Path, examples_path: str | Path, out_path: str | Path) -> None:
    """The `head_inputs` rule: every split's examples and every head's attention on them in one file
    (`contracts.HeadInputs`), so each per-head job reads one file and imports only numpy."""
    examples = EXAMPLES.read(examples_path)
    parts = {split: split_examples(examples, split) for split in SPLITS}
    layers = layers_in(attention_dir)
    if not layers:
        raise ValueError(f"no layer*.parquet files in {attention_dir}")
    attention = {}
    for layer in layers:
        stored = read_attention(layer_file(attention_dir, layer))
        for head in sorted({h for h, _ in stored}):
            for split, part in parts.items():
                flat = []
                for example_id, n in zip(part.example_ids, part.lengths):
                    triangle = stored.get((head, example_id))
                    if triangle is None or len(triangle) != triangle_size(n):
                        raise ValueError(f"L{layer}H{head}: attention for example {example_id} is missing or "
                                         f"not {n} x {n}")
                    flat.append(triangle)
                attention[HeadId(layer, head), split] = np.concatenate(flat)
    HeadInputs.write(out_path, parts, attention)


def extract_model(info, examples_path: str | Path, out_dir: str | Path, batch_size: int,
                  device: str = "auto") -> list[Path]:
    """The `extract` rule: load the model and write every head's attention for the corpus examples."""
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(info)
    model = load_model(info, device)
    return extract_attention(model, EXAMPLES.read(examples_path), out_dir, batch_size, tokenizer.pad_token_id)
