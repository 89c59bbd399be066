"""Extraction: one batched eager forward pass over a model's examples, every head's attention to Parquet.

Layout: one file per layer, `layer{L}.parquet`, one row per (example, head) holding the lower triangle of
that head's n x n attention matrix row by row (row i has i+1 values; the rest is zero for a causal model).
A file per layer keeps the file count small (30 for SmolLM2, not 270) while a reader can still fetch one
head cheaply with a Parquet filter. Memory stays bounded: batches stream straight into the writers.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

SCHEMA = pa.schema([("example_id", pa.int64()), ("head", pa.int32()), ("n", pa.int32()),
                    ("attention", pa.list_(pa.float32()))])


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


def _layer_rows(attention: np.ndarray, example_ids: list[int], lengths: list[int]) -> pa.RecordBatch:
    """Rows for one layer of one batch; attention is (batch, heads, T, T) float32."""
    n_heads = attention.shape[1]
    values, offsets, ids, heads, ns = [], [0], [], [], []
    for b, (example_id, n) in enumerate(zip(example_ids, lengths)):
        rows, cols = np.tril_indices(n)
        tri = attention[b, :, :n, :n][:, rows, cols]  # (heads, n(n+1)/2)
        values.append(tri.reshape(-1))
        offsets.extend(offsets[-1] + tri.shape[1] * (np.arange(n_heads) + 1))
        ids += [example_id] * n_heads
        heads += list(range(n_heads))
        ns += [n] * n_heads
    flat = pa.array(np.concatenate(values).astype(np.float32, copy=False))
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.int64()), pa.array(heads, pa.int32()), pa.array(ns, pa.int32()), lists], schema=SCHEMA)


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
    writers = [pq.ParquetWriter(tmp, SCHEMA) for tmp in temps]
    try:
        for batch in tqdm(batches_by_length(examples, batch_size), desc="extract", unit="batch",
                          disable=not progress):
            ids, mask = padded_batch(batch, pad_id, device)
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
            lengths = [len(seq) for seq in batch["input_ids"]]
            for layer, attention in enumerate(out.attentions):
                attention = attention.float().cpu().numpy()
                writers[layer].write_batch(_layer_rows(attention, batch["example_id"].tolist(), lengths))
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


def dense(flat: np.ndarray, n: int) -> np.ndarray:
    """The n x n matrix from its lower triangle stored row by row."""
    matrix = np.zeros((n, n), dtype=np.float32)
    matrix[np.tril_indices(n)] = flat
    return matrix


def read_head_attention(path: str | Path, head: int) -> dict[int, np.ndarray]:
    """One head's attention from a layer file: {example_id: n x n float32 matrix}."""
    table = pq.read_table(path, filters=[("head", "==", head)])
    return {int(example_id): dense(np.asarray(flat, dtype=np.float32), int(n)) for example_id, n, flat in
            zip(table["example_id"].to_pylist(), table["n"].to_pylist(), table["attention"].to_numpy())}


def read_layer_attention(path: str | Path) -> dict[tuple[int, int], np.ndarray]:
    """Every head of a layer file: {(head, example_id): n x n float32 matrix}."""
    table = pq.read_table(path)
    return {(int(h), int(e)): dense(np.asarray(flat, dtype=np.float32), int(n)) for e, h, n, flat in
            zip(table["example_id"].to_pylist(), table["head"].to_pylist(), table["n"].to_pylist(),
                table["attention"].to_numpy())}


def extract_model(info: dict, examples_path: str | Path, out_dir: str | Path, batch_size: int,
                  device: str = "auto") -> list[Path]:
    """The `extract` rule: load the model and write every head's attention for the corpus examples."""
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(info)
    model = load_model(info, device)
    return extract_attention(model, pd.read_parquet(examples_path), out_dir, batch_size, tokenizer.pad_token_id)
