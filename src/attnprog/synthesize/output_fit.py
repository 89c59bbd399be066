"""The output-aware fit (`synthesis.offline.objective: output`): weights chosen for the error a program causes
in the head's output rather than in its attention.

Head h's output at token i is o_i = sum_j A_ij u_j, where u_j is the value vector of key j (of h's key/value
group) projected by h's slice of the output projection. A program's attention P differs from the head's A
by D = P - A, which changes the output by D U, and

    ||(P - A) U||^2 = sum_i d_i^T G d_i,      G = U U^T  (n x n per example; extraction records it),

so an error on a key whose value vector is near zero (typically the first token, the "attention sink")
costs nothing, and moving attention between two keys costs as much as their value vectors differ: what
the rest of the model sees. Cross-entropy and IoU count every unit of misplaced attention alike.

The objective, per head on the synth split, on columns rescaled to unit root-mean-square:

    L(w) = sum_i d_i^T G d_i / Z  +  CE_WEIGHT * mean row cross-entropy  +  L2 / 2 |w|^2

Z is the same output error for the uniform matrix (all weights 0), so the first term reads "output error
relative to the uniform matrix's" on every head and one L2 suits all. A little cross-entropy keeps the fit
from chasing the few keys with large value vectors. Two ways to a candidate, as the research branch
measured them (README, "Offline synthesis"):

    refit_for_output    the cross-entropy fit's terms, weights refitted for L (from the cross-entropy weights)
    greedy_output_fit   terms chosen by L itself: forward selection by the pull of L's gradient, as
                        fit.greedy_fit does with the cross-entropy's

The programs keep their form (softmax of a weighted sum of primitives); only the weights and, for the
second, which primitives differ.
"""
from __future__ import annotations

import numpy as np

from ..matrices import split_packed, tril_indices, unpack_symmetric
from .fit import SplitData, _row_terms, row_softmax

# From the research branch's fits of all 270 SmolLM2 heads: the output error alone overfits the few keys
# whose value vectors are large; 0.3 x cross-entropy kept the fit on test.
CE_WEIGHT = 0.3
L2 = 1e-6           # on the rescaled weights; the objective is ~1 at the uniform matrix on every head
MAX_ITER = 300      # L-BFGS iterations for a fit at a size asked for
INNER_ITER = 50     # ... and between the sizes asked for, where the fit only has to pick the next term


class ValueGrams:
    """One head's value Grams on the examples of a SplitData, laid out to meet its flat entries: G padded
    to (E, N, N), and where each flat entry (example e, row i, column j <= i) sits in an (E, N, N) array.

    With that layout the output error of all examples is one batched product: scatter the flat attention
    error into (E, N, N), multiply by G, gather back."""

    def __init__(self, packed: np.ndarray, data: SplitData):
        lengths = [int(n) for n in data.lengths]
        if len(packed) != len(data.y):
            raise ValueError(f"value Grams ({len(packed)} entries) do not match the attention ({len(data.y)})")
        self.size = max(lengths)
        self.G = np.zeros((len(lengths), self.size, self.size))
        places = []
        for e, (part, n) in enumerate(zip(split_packed(np.asarray(packed, dtype=np.float64), lengths), lengths)):
            self.G[e, :n, :n] = unpack_symmetric(part, n)
            rows, cols = tril_indices(n)
            places.append((e * self.size + rows) * self.size + cols)
        self.where = np.concatenate(places)
        self.row_lengths = np.diff(np.append(data.row_starts, len(data.y)))
        uniform = np.repeat(1.0 / self.row_lengths, self.row_lengths)
        error = float(self.errors(uniform - data.y)[0].sum())
        self.Z = error if error > 0 else 1.0  # a head whose values are all zero: nothing to be relative to

    def errors(self, diff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a flat attention error `diff` (like SplitData.y): each example's output error
        sum_i d_i^T G d_i (E,), and (D G) at the flat entries (half the error's gradient)."""
        D = np.zeros(self.G.size)
        D[self.where] = diff
        D = D.reshape(self.G.shape)
        DG = D @ self.G
        return np.einsum("eij,eij->e", D, DG), DG.reshape(-1)[self.where]


def relative_output_error(p: np.ndarray, data: SplitData, grams: ValueGrams) -> float:
    """Mean over examples of ||(P - A) U|| / ||(uniform - A) U||: 0 is the head's own output, 1 no better
    than the uniform matrix (per example, like soft IoU)."""
    uniform = np.repeat(1.0 / grams.row_lengths, grams.row_lengths)
    error, _ = grams.errors(p - data.y)
    base, _ = grams.errors(uniform - data.y)
    return float(np.mean(np.sqrt(np.maximum(error, 0) / np.maximum(base, 1e-30))))


def _objective(u: np.ndarray, Xs: np.ndarray, data: SplitData, grams: ValueGrams, ce_weight: float, l2: float):
    """L(u) on rescaled columns Xs, and its gradient."""
    log_p, p = _row_terms(u, Xs, data.y, data.row_starts)
    error, DG = grams.errors(p - data.y)
    dL_dp = 2 * DG / grams.Z
    # through each row's softmax: d score_j = p_j (g_j - sum_k p_k g_k)
    ds = p * (dL_dp - np.repeat(np.add.reduceat(p * dL_dp, data.row_starts), grams.row_lengths))
    loss = float(error.sum()) / grams.Z
    if ce_weight:
        loss -= ce_weight * float(data.y @ log_p) / data.n_rows
        ds += ce_weight * (p - data.y) / data.n_rows
    return loss + 0.5 * l2 * float(u @ u), Xs.T @ ds + l2 * u


def _column_scales(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's root-mean-square (1 where a column is all zero) and whether it is usable (not zero).
    Fitting on unit columns lets one L2 suit them all, as in fit.greedy_fit."""
    rms = np.sqrt(np.einsum("dk,dk->k", X, X) / len(X))
    return np.where(rms > 0, rms, 1.0), rms > 0


def _minimise(u0, Xs, data, grams, ce_weight, l2, max_iter) -> np.ndarray:
    from scipy.optimize import minimize  # here: importing it costs every per-head job a quarter second

    result = minimize(_objective, u0, args=(Xs, data, grams, ce_weight, l2), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter})
    return result.x


def refit_for_output(X: np.ndarray, w: np.ndarray, data: SplitData, grams: ValueGrams,
                     ce_weight: float = CE_WEIGHT, l2: float = L2, max_iter: int = MAX_ITER) -> np.ndarray:
    """The weights on the columns X (a fitted candidate's terms) that minimise L, by L-BFGS from w (the
    cross-entropy fit's weights). Returns weights on the unscaled columns."""
    scale, _ = _column_scales(X)
    u = _minimise(np.asarray(w, dtype=float) * scale, X / scale, data, grams, ce_weight, l2, max_iter)
    return u / scale


def greedy_output_fit(data: SplitData, sizes: list[int], start: list[int] = (), *, grams: ValueGrams,
                      ce_weight: float = CE_WEIGHT, l2: float = L2) -> list[tuple[list[int], np.ndarray]]:
    """Forward selection of primitives (columns of data.X) by L, from the columns in `start` on: each step
    adds the column whose weight L's gradient pulls on hardest (a new column enters at weight 0) and refits
    all the chosen weights. Returns (chosen columns, weights on the unscaled columns) for each size in
    `sizes`, as fit.greedy_fit does."""
    scale, usable = _column_scales(data.X)
    Xs = np.asfortranarray(data.X / scale)
    chosen, out = list(start), []
    u = _minimise(np.zeros(len(chosen)), Xs[:, chosen], data, grams, ce_weight, l2, MAX_ITER) if chosen \
        else np.zeros(0)
    for step in range(len(chosen) + 1, max(sizes) + 1):
        full = np.zeros(Xs.shape[1])
        full[chosen] = u
        _, grad = _objective(full, Xs, data, grams, ce_weight, 0.0)
        pull = np.abs(grad)
        pull[chosen] = -1.0
        pull[~usable] = -1.0
        best = int(np.argmax(pull))
        if pull[best] <= 1e-12:  # nothing left that moves the output
            break
        chosen.append(best)
        u = _minimise(np.append(u, 0.0), Xs[:, chosen], data, grams, ce_weight, l2,
                      MAX_ITER if step in sizes else INNER_ITER)
        if step in sizes:
            out.append((list(chosen), u / scale[chosen]))
    return out


def predicted_output_error(X: np.ndarray, w: np.ndarray, data: SplitData, grams: ValueGrams) -> float:
    """relative_output_error of the program softmax(X w)."""
    return relative_output_error(row_softmax(X @ w, data.row_starts), data, grams)
