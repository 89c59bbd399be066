"""Choosing the library: the fewest programs that explain every head almost as well as the whole pool.

The paper's claim is that a small library (< 1,000 programs) explains every head of a model. Given a val
score of every pooled program on every head, higher is better (soft IoU by default; with
`library.choose_by: output`, minus the relative output error: `measure_tables`), two classic greedy
algorithms answer two questions:
- `cover`: the smallest library in which every head has a program within `tolerance` of the pool's best for
  it (set cover; greedy adds the program that brings the most heads within tolerance, which is within a
  logarithmic factor of the optimum; ties go to the larger gain in summed IoU, then to the shorter program).
- `facility_order`: the best library of each size k, for the curve of mean score against library size
  (facility location, sum over heads of the best score in the library above the pool's worst: monotone
  submodular, so greedy is within 1 - 1/e of the optimum for every k).

Within a library each head takes the program with the fewest terms among those within `prefer_shorter`
of the library's best on that head (on val), so the library favours programs a person can hold in mind.
Everything here is chosen on val; test is only reported.
"""
from __future__ import annotations

import numpy as np

CURVE_SIZES = (1, 5, 10, 20, 50, 100)


def measure_tables(iou: dict, output_error: dict | None, choose_by: str) -> dict:
    """The per-split (programs, heads) score the library chooses by, higher is better: IoU, or minus the
    relative output error (`LibrarySettings.margins` are in its units)."""
    if choose_by == "iou":
        return iou
    if output_error is None:
        raise ValueError("library.choose_by: output needs the value Grams that extraction records with "
                         "synthesis.offline.objective: output; these head inputs have none")
    return {s: -table for s, table in output_error.items()}


def cover(val: np.ndarray, eligible: np.ndarray, tolerance: float, length: np.ndarray) -> list[int]:
    """The library: eligible programs in the order greedy set cover adds them, until every head has one
    within `tolerance` of the best eligible program for it. val: (P, H) scores, higher is better; length: (P,)
    program sizes."""
    candidates = _eligible(eligible)
    scores = val[candidates]
    covers = scores >= scores.max(axis=0) - tolerance     # (C, H): program c is good enough for head h
    covered = np.zeros(val.shape[1], dtype=bool)
    current = scores.min(axis=0)  # gains count from the pool's worst, so any sign of score works
    order = []
    while not covered.all():
        new = (covers & ~covered).sum(axis=1)
        plain = np.maximum(scores - current, 0).sum(axis=1)
        pick = np.lexsort((length[candidates], -plain, -new))[0]  # most new heads, then IoU gain, then shorter
        order.append(int(candidates[pick]))
        covered |= covers[pick]
        current = np.maximum(current, scores[pick])
    return order


def facility_order(val: np.ndarray, eligible: np.ndarray, length: np.ndarray, steps: int) -> list[int]:
    """The first `steps` eligible programs in greedy facility-location order: each adds the most summed val
    score over heads (each head counting its best program so far); ties go to the shorter program."""
    candidates = _eligible(eligible)
    scores = val[candidates]
    current = scores.min(axis=0)
    chosen = np.zeros(len(candidates), dtype=bool)
    order = []
    for _ in range(min(steps, len(candidates))):
        gain = np.where(chosen, -np.inf, np.maximum(scores - current, 0).sum(axis=1))
        pick = np.lexsort((length[candidates], -gain))[0]
        chosen[pick] = True
        order.append(int(candidates[pick]))
        current = np.maximum(current, scores[pick])
    return order


def _eligible(eligible: np.ndarray) -> np.ndarray:
    candidates = np.flatnonzero(eligible)
    if not len(candidates):
        raise ValueError("no eligible program to choose a library from")
    return candidates


def assign_heads(val: np.ndarray, members: list[int], length: np.ndarray, prefer_shorter: float) -> np.ndarray:
    """For each head, the program of `members` it takes: the one with the fewest terms among those within
    `prefer_shorter` of the members' best val score on that head (then the higher val score)."""
    members = np.asarray(members)
    scores = val[members]                              # (M, H)
    near = scores >= scores.max(axis=0) - prefer_shorter
    lengths = np.where(near, length[members][:, None], np.inf)
    shortest = near & (lengths == lengths.min(axis=0))
    return members[np.argmax(np.where(shortest, scores, -np.inf), axis=0)]  # among those, the highest score


def size_curve(val: np.ndarray, reported: dict[str, dict], order: list[int], eligible: np.ndarray,
               length: np.ndarray, prefer_shorter: float, sizes=CURVE_SIZES) -> list[dict]:
    """For the nested libraries order[:k] (a `facility_order` by the score `val`) for each k in `sizes` that
    the order reaches, and for the whole eligible pool (the unrestricted choice): the mean over heads of
    each `reported` table ({measure: {split: (P, H)}}, e.g. IoU and output error) of the programs chosen."""
    heads = np.arange(val.shape[1])
    pool = list(np.flatnonzero(eligible))
    libraries = [(k, order[:k]) for k in sizes if k <= len(order) and k < len(pool)] + [(len(pool), pool)]
    out = []
    for k, members in libraries:
        chosen = assign_heads(val, members, length, prefer_shorter)
        out.append({"size": k, **{f"mean_{split}_{measure}": float(table[chosen, heads].mean())
                                  for measure, tables in reported.items() for split, table in tables.items()}})
    return out
