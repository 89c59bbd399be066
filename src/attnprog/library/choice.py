"""Choosing the library: the fewest programs that explain every head almost as well as the whole pool.

The paper's claim is that a small library (< 1,000 programs) explains every head of a model. Given the val
IoU of every pooled program on every head, the library is chosen as a submodular set cover: greedily add
the program that raises  F(S) = sum_h min(best IoU of S on h, best IoU of the pool on h - tolerance)  the
most (truncated facility location; ties go to the plain facility-location gain, then to the shorter
program), until every head is within `tolerance` of its best. Greedy is the classic algorithm for this
problem (Wolsey 1982: within a logarithmic factor of the smallest cover). Continuing the same greedy
order past the cover, with the untruncated objective, gives nested libraries of every size: the curve of
mean IoU against library size.

Within a library each head takes the program with the fewest terms among those within `prefer_shorter`
of the library's best on that head (on val), so the library favours programs a person can hold in mind.
Everything here is chosen on val; test is only reported.
"""
from __future__ import annotations

import numpy as np


def greedy_order(val: np.ndarray, eligible: np.ndarray, tolerance: float, length: np.ndarray,
                 min_steps: int = 0) -> tuple[list[int], int]:
    """Programs in greedy order and how many of them make the cover.

    val: (P, H) val IoU; eligible: (P,) programs that may be chosen; length: (P,) size of each program
    (fewer terms first on ties). The order runs until the cover is complete and at least `min_steps` long.
    Returns (order, cover size)."""
    candidates = np.flatnonzero(eligible)
    if not len(candidates):
        raise ValueError("no eligible program to choose a library from")
    scores = val[candidates]
    target = scores.max(axis=0) - tolerance          # each head is covered once some program reaches this
    current = np.zeros(val.shape[1])                  # best IoU of the chosen programs per head (0: none yet)
    order, chosen, cover = [], np.zeros(len(candidates), dtype=bool), None
    for step in range(len(candidates)):
        if cover is not None and step >= min_steps:
            break
        if cover is None:
            capped = np.minimum(scores, target)
            gain = np.maximum(capped - np.minimum(current, target), 0).sum(axis=1)
        else:
            gain = np.zeros(len(candidates))
        plain = np.maximum(scores - current, 0).sum(axis=1)
        # lexicographic: truncated gain, then plain gain, then shorter; np.lexsort sorts by the last key first
        rank = np.lexsort((length[candidates], -plain, -gain) if cover is None else (length[candidates], -plain))
        pick = next(k for k in rank if not chosen[k])
        chosen[pick] = True
        order.append(int(candidates[pick]))
        current = np.maximum(current, scores[pick])
        if cover is None and np.all(current >= target - 1e-12):
            cover = step + 1
    return order, cover if cover is not None else len(order)


def assign_heads(val: np.ndarray, members: list[int], length: np.ndarray, prefer_shorter: float) -> np.ndarray:
    """For each head, the program of `members` it takes: the one with the fewest terms among those within
    `prefer_shorter` of the members' best val IoU on that head (then the higher val IoU)."""
    members = np.asarray(members)
    scores = val[members]                              # (M, H)
    best = scores.max(axis=0)
    near = scores >= best - prefer_shorter
    # among the near-best: smallest length, then highest IoU
    key = np.where(near, length[members][:, None] * 1e3 - scores, np.inf)
    return members[np.argmin(key, axis=0)]


CURVE_SIZES = (1, 5, 10, 20, 50, 100)


def size_curve(val: np.ndarray, test: np.ndarray, order: list[int], eligible: np.ndarray, length: np.ndarray,
               prefer_shorter: float, sizes=CURVE_SIZES) -> list[dict]:
    """Mean val and test IoU over heads of the nested libraries order[:k] for each k in `sizes` that the
    order reaches, and of the whole eligible pool (the unrestricted choice)."""
    heads = np.arange(val.shape[1])
    pool = list(np.flatnonzero(eligible))
    libraries = [(k, order[:k]) for k in sizes if k <= len(order) and k < len(pool)] + [(len(pool), pool)]
    out = []
    for k, members in libraries:
        chosen = assign_heads(val, members, length, prefer_shorter)
        out.append({"size": k, "mean_val_iou": float(val[chosen, heads].mean()),
                    "mean_test_iou": float(test[chosen, heads].mean())})
    return out
