"""Fitting a head: soft-label multinomial logistic regression over the primitives, one softmax per row.

score(i, j) = sum_k w_k * primitive_k(i, j); attention row i = softmax over j <= i. The weights minimise the
row cross-entropy to the head's synth-split rows (convex; damped Newton), primitives are added by greedy
forward selection, and each fit is then polished for IoU (the L1 distance between rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..matrices import split_packed, triangle_size


@dataclass
class SplitData:
    """One split of one head, flattened: X (D, K) primitives, y (D,) attention, the examples' lengths, and
    where rows and examples start in the flat arrays."""
    X: np.ndarray
    y: np.ndarray
    lengths: np.ndarray
    row_starts: np.ndarray
    example_starts: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.row_starts)


def split_data(X: np.ndarray, lengths, attention: np.ndarray) -> SplitData:
    """Join a split's primitives X (D, K) with one head's packed attention on the same examples (D,)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(attention) != len(X) or len(X) != sum(triangle_size(int(n)) for n in lengths):
        raise ValueError(f"primitives ({len(X)} entries) and attention ({len(attention)}) do not match the "
                         f"examples' lengths")
    row_lengths = np.concatenate([np.arange(1, n + 1) for n in lengths])
    row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]])
    example_starts = np.concatenate([[0], np.cumsum(lengths * (lengths + 1) // 2)[:-1]])
    y = np.asarray(attention, dtype=np.float64)
    sums = np.add.reduceat(y, row_starts)  # rows of a softmax sum to 1; make it exact for the loss
    y = y / np.repeat(np.where(sums > 0, sums, 1.0), row_lengths)
    return SplitData(np.asarray(X, dtype=np.float64), y, lengths, row_starts, example_starts)


# ---- the fit: soft-label multinomial logistic regression, one softmax per attention row ----

def row_softmax(scores: np.ndarray, row_starts: np.ndarray) -> np.ndarray:
    row_lengths = np.diff(np.append(row_starts, len(scores)))
    top = np.repeat(np.maximum.reduceat(scores, row_starts), row_lengths)
    e = np.exp(scores - top)
    return e / np.repeat(np.add.reduceat(e, row_starts), row_lengths)


def _row_terms(w, X, y, row_starts):
    s = X @ w
    row_lengths = np.diff(np.append(row_starts, len(s)))
    top = np.maximum.reduceat(s, row_starts)
    e = np.exp(s - np.repeat(top, row_lengths))
    sums = np.add.reduceat(e, row_starts)
    log_p = s - np.repeat(top + np.log(sums), row_lengths)
    return log_p, e / np.repeat(sums, row_lengths)


def fit_weights(X: np.ndarray, y: np.ndarray, row_starts: np.ndarray, l2: float = 1e-3,
                start: np.ndarray | None = None, max_iter: int = 50, tol: float = 1e-7) -> np.ndarray:
    """Weights w minimising mean row cross-entropy of softmax(X w) against y, plus l2/2 |w|^2.

    Damped Newton: with a handful of columns the exact Hessian is cheap, and it converges in a few steps
    where first-order methods crawl (primitives overlap, weights get large)."""
    n_rows, k = len(row_starts), X.shape[1]
    w = np.zeros(k) if start is None else np.array(start, dtype=float)

    def loss_of(w):
        log_p, p = _row_terms(w, X, y, row_starts)
        return -(y @ log_p) / n_rows + 0.5 * l2 * (w @ w), p

    loss, p = loss_of(w)
    for _ in range(max_iter):
        grad = X.T @ (p - y) / n_rows + l2 * w
        Xp = X * p[:, None]
        per_row = np.add.reduceat(Xp, row_starts, axis=0)
        hessian = (X.T @ Xp - per_row.T @ per_row) / n_rows + l2 * np.eye(k)
        step = np.linalg.solve(hessian, grad)
        decrease = grad @ step
        if decrease / 2 < tol:
            break
        t = 1.0
        while True:
            new_loss, new_p = loss_of(w - t * step)
            if new_loss <= loss - 0.25 * t * decrease or t < 1e-6:
                break
            t /= 2
        w, loss, p = w - t * step, new_loss, new_p
    return w


def predicted_iou(X: np.ndarray, w: np.ndarray, data: SplitData) -> float:
    """Mean soft IoU over examples between softmax(X w) and the head."""
    p = row_softmax(X @ w, data.row_starts)
    low = np.add.reduceat(np.minimum(p, data.y), data.example_starts)
    high = np.add.reduceat(np.maximum(p, data.y), data.example_starts)
    return float(np.mean(low / high))


INNER_NEWTON_STEPS = 2


def greedy_fit(data: SplitData, sizes: list[int], l2: float = 1e-3,
               start: list[int] = ()) -> list[tuple[list[int], np.ndarray]]:
    """Forward selection of primitives (columns of data.X), from the columns in `start` on. Returns, for each
    size in `sizes`, (chosen columns, weights).

    Columns are rescaled to unit root-mean-square while fitting so one l2 suits all of them; the returned
    weights apply to the unscaled primitives."""
    scale = np.sqrt(np.einsum("dk,dk->k", data.X, data.X) / len(data.X))
    usable = scale > 0
    Xs = np.asfortranarray(data.X / np.where(usable, scale, 1.0))  # columns contiguous: cheap to pick
    steps = max(sizes)
    chosen, out = list(start), []
    Xc = np.empty((len(data.y), max(steps, len(chosen))), order="F")  # the chosen columns, filled as chosen
    Xc[:, :len(chosen)] = Xs[:, chosen]
    w = fit_weights(Xc[:, :len(chosen)], data.y, data.row_starts, l2) if chosen else np.zeros(0)
    p = row_softmax(Xc[:, :len(chosen)] @ w, data.row_starts)
    for step in range(len(chosen) + 1, steps + 1):
        pull = np.abs(Xs.T @ (p - data.y))
        pull[chosen] = -1.0
        pull[~usable] = -1.0
        best = int(np.argmax(pull))
        if pull[best] <= 1e-9 * data.n_rows:
            break
        chosen.append(best)
        Xc[:, step - 1] = Xs[:, best]
        # between the sizes asked for, a few Newton steps suffice to pick the next column (the next fit
        # starts from these weights); at a size asked for, the fit converges
        w = fit_weights(Xc[:, :step], data.y, data.row_starts, l2, start=np.append(w, 0.0),
                        max_iter=50 if step in sizes else INNER_NEWTON_STEPS)
        p = row_softmax(Xc[:, :step] @ w, data.row_starts)
        if step in sizes:
            out.append((list(chosen), w / scale[chosen]))
    return out


def refine_for_iou(X: np.ndarray, w: np.ndarray, data: SplitData, steps: int = 30,
                   learning_rate: float = 0.05) -> np.ndarray:
    """Polish weights to lower the L1 distance between predicted and real rows, which is what soft IoU
    measures (IoU = (S - L1) / (S + L1) for row-stochastic matrices). Cross-entropy hedges where a head is
    unpredictable; L1 prefers committing, so this lifts IoU. A few Adam steps (on columns rescaled to unit
    size) from the cross-entropy fit; returns the weights with the lowest L1 seen, the start included."""
    scale = np.sqrt(np.mean(X ** 2, axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    Xs, u = X / scale, w * scale
    sizes = data.lengths * (data.lengths + 1) // 2
    weight = np.repeat(1.0 / data.lengths, sizes)  # each example counts once, as in the IoU mean
    row_lengths = np.diff(np.append(data.row_starts, len(data.y)))
    best_u, best_l1 = u, np.inf
    m, v = np.zeros_like(u), np.zeros_like(u)
    for t in range(1, steps + 2):
        p = row_softmax(Xs @ u, data.row_starts)
        diff = p - data.y
        l1 = float(np.abs(diff) @ weight)
        if l1 < best_l1:
            best_u, best_l1 = u, l1
        if t > steps:
            break
        g = np.sign(diff) * weight
        g_bar = np.repeat(np.add.reduceat(p * g, data.row_starts), row_lengths)
        grad = Xs.T @ (p * (g - g_bar))
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        u = u - learning_rate * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return best_u / scale


def flat_jsd(p: np.ndarray, data: SplitData) -> float:
    """Mean row Jensen-Shannon distance between predicted rows `p` (flat, like data.y) and the head."""
    from ..scoring import jsd_rows_flat

    return float(np.mean([jsd_rows_flat(a, b, int(n)) for a, b, n in
                          zip(split_packed(p, data.lengths), split_packed(data.y, data.lengths), data.lengths)]))
