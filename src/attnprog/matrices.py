"""Attention matrices as every stage stores, normalises and compares them.

A causal head's matrix is lower-triangular, so files hold only the lower triangle, row by row (row i holds
i + 1 values), and several examples are stored as their triangles concatenated. This module is the one
place that packs and unpacks that layout (the symmetric value Grams of extraction use it too), normalises a
program's output into attention, and builds the uniform causal matrix (the paper's baseline).
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1024)
def tril_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, columns) of the entries j <= i of an n x n matrix, row by row (cached; do not modify)."""
    rows, cols = np.tril_indices(n)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def triangle_size(n: int) -> int:
    return n * (n + 1) // 2


def pack(matrix: np.ndarray) -> np.ndarray:
    """The lower triangle of an n x n matrix (or of each matrix of a stack (..., n, n)), row by row."""
    return matrix[(..., *tril_indices(matrix.shape[-1]))]


def unpack(flat: np.ndarray, n: int) -> np.ndarray:
    """The n x n float32 matrix whose lower triangle, row by row, is `flat` (zeros above the diagonal)."""
    if len(flat) != triangle_size(n):
        raise ValueError(f"a lower triangle of {n} x {n} has {triangle_size(n)} values, got {len(flat)}")
    matrix = np.zeros((n, n), dtype=np.float32)
    matrix[tril_indices(n)] = flat
    return matrix


def unpack_symmetric(flat: np.ndarray, n: int) -> np.ndarray:
    """The symmetric n x n matrix (float64) whose lower triangle, row by row, is `flat`: how value Grams
    (extraction, `contracts.VALUE_GRAMS`) are stored, in the attention's layout."""
    lower = unpack(flat, n).astype(np.float64)
    return lower + np.tril(lower, -1).T


def split_packed(flat: np.ndarray, lengths) -> list[np.ndarray]:
    """Concatenated lower triangles (along the last axis) -> one packed triangle per example (views)."""
    ends = np.cumsum([triangle_size(int(n)) for n in lengths])
    if flat.shape[-1] != (ends[-1] if len(ends) else 0):
        raise ValueError(f"{flat.shape[-1]} values do not make triangles of lengths {list(lengths)[:5]}...")
    return np.split(flat, ends[:-1], axis=-1)


def unpack_many(flat: np.ndarray, lengths) -> list[np.ndarray]:
    """Concatenated lower triangles -> one n x n float32 matrix per example."""
    return [unpack(part, int(n)) for part, n in zip(split_packed(flat, lengths), lengths)]


def row_starts(n: int) -> np.ndarray:
    """Where each row of an n x n lower triangle starts in its packed form: i (i + 1) / 2."""
    return np.concatenate([[0], np.cumsum(np.arange(1, n))]) if n else np.zeros(0, dtype=int)


def normalise(matrix, n: int | None = None, causal: bool = True) -> np.ndarray:
    """The one normalisation every consumer uses: float32 n x n, causal mask (when `causal`), NaN/inf and
    negatives set to 0, each row divided by its sum; a row left all zero attends to position 0."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0] if n is None and m.ndim else n
    if m.shape != (n, n):
        raise ValueError(f"attention matrix has shape {m.shape}, expected ({n}, {n})")
    m = np.tril(m) if causal else m.copy()
    finite = np.isfinite(m)
    if not finite.all():
        m[~finite] = 0.0
    np.maximum(m, 0.0, out=m)
    with np.errstate(over="ignore"):
        sums = m.sum(axis=1)
    if not np.isfinite(sums).all():  # values near the float64 limit: scale each row by its largest first
        top = m.max(axis=1, keepdims=True)
        m = np.divide(m, top, out=np.zeros_like(m), where=top > 0)
        sums = m.sum(axis=1)
    empty = sums <= 0
    if empty.any():
        m[empty, 0] = 1.0
        sums[empty] = 1.0
    m /= sums[:, None]
    return m.astype(np.float32)


def is_normalised_packed(flat: np.ndarray, n: int, atol: float = 1e-3) -> bool:
    """Is `flat` a packed lower triangle whose every row is a distribution (finite, >= 0, sums to 1)?"""
    if len(flat) != triangle_size(n):
        return False
    if n == 0:
        return True
    if not (np.isfinite(flat).all() and flat.min() >= 0):
        return False
    sums = np.add.reduceat(flat, row_starts(n), dtype=np.float64)
    return bool(np.abs(sums - 1).max() <= atol)


def uniform(n: int) -> np.ndarray:
    """The uniform causal matrix: token i attends equally to tokens 0..i (float32)."""
    return np.tril(np.ones((n, n), dtype=np.float32)) / np.arange(1, n + 1, dtype=np.float32)[:, None]
