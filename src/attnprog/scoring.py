"""How close a program's attention is to a head's: soft IoU, Jensen-Shannon distance, and the baselines.

Soft IoU over the whole matrix (METHOD.md): IoU(A, B) = sum_ij min(A_ij, B_ij) / sum_ij max(A_ij, B_ij),
averaged over examples. Because min(a, b) = (a + b - |a - b|) / 2 and max(a, b) = (a + b + |a - b|) / 2,
IoU = (S - L1) / (S + L1) with S = sum(A) + sum(B) and L1 = sum |A - B|. That turns scoring every program
on every head into one pairwise L1-distance matrix per example (scipy's `cdist`), and a program's output is
computed once per example whatever the head.

Jensen-Shannon distance (the square root of the JS divergence, base 2, so in [0, 1]) is computed per row
and averaged over the rows of an example, then over examples.

Matrices are compared on their lower triangle (entries above the diagonal are zero for both after the
runner's causal normalisation), packed row by row as `matrices.pack` does.
"""
import numpy as np

from . import matrices

BASELINE_NAMES = ("random_token", "random_column", "uniform", "first_token")


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """sum min(a, b) / sum max(a, b) over all entries of two same-shape arrays (1.0 when both are zero)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"soft_iou: shapes differ, {a.shape} vs {b.shape}")
    top = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / top) if top > 0 else 1.0


def row_jsd(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Jensen-Shannon distance (base 2) between row i of `a` and row i of `b`.
    Rows are taken as given (they should each sum to 1)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"row_jsd: shapes differ, {a.shape} vs {b.shape}")
    m = (a + b) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_a = np.where(a > 0, a * np.log2(a / m), 0.0).sum(axis=-1)
        kl_b = np.where(b > 0, b * np.log2(b / m), 0.0).sum(axis=-1)
    return float(np.sqrt(np.clip((kl_a + kl_b) / 2, 0.0, 1.0)).mean())


def mean_iou(predicted: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Soft IoU averaged over examples (two lists of matrices, in the same order)."""
    if len(predicted) != len(actual) or not actual:
        raise ValueError(f"mean_iou: need two equally long non-empty lists, got {len(predicted)} and {len(actual)}")
    return float(np.mean([soft_iou(p, a) for p, a in zip(predicted, actual)]))


def mean_jsd(predicted: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Row Jensen-Shannon distance averaged over examples."""
    if len(predicted) != len(actual) or not actual:
        raise ValueError(f"mean_jsd: need two equally long non-empty lists, got {len(predicted)} and {len(actual)}")
    return float(np.mean([row_jsd(p, a) for p, a in zip(predicted, actual)]))


def iou_table(predicted: list[np.ndarray], actual: list[np.ndarray]) -> np.ndarray:
    """Mean soft IoU of every prediction against every target, averaged over examples.

    predicted[e]: (P, d_e) flattened matrices of P programs on example e; actual[e]: (H, d_e) the same for
    H heads. Returns a (P, H) array: entry [p, h] = mean over e of IoU(predicted[e][p], actual[e][h]).
    """
    if len(predicted) != len(actual) or not actual:
        raise ValueError(f"iou_table: need two equally long non-empty lists, got {len(predicted)} and {len(actual)}")
    total = None
    for p, a in zip(predicted, actual):
        p, a = np.asarray(p, dtype=float), np.asarray(a, dtype=float)
        l1 = _l1_distances(p, a)
        s = p.sum(axis=1)[:, None] + a.sum(axis=1)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(s + l1 > 0, (s - l1) / (s + l1), 1.0)
        total = iou if total is None else total + iou
    return total / len(actual)


def output_error_table(predicted: list[np.ndarray], actual: list[np.ndarray], grams: list[np.ndarray],
                       chunk: int = 256) -> np.ndarray:
    """Mean relative output error of every prediction on every head, averaged over examples: for program P
    and head A with value Grams G = U U^T (`contracts.VALUE_GRAMS`), ||(P - A) U|| / ||(uniform - A) U||,
    0 = the head's own output, 1 = no better than the uniform matrix (as `synthesize.output_fit` fits it).

    predicted[e]: (P, d_e) packed matrices of P programs on example e; actual[e] and grams[e]: (H, d_e) the
    heads' packed attention and packed (symmetric) Grams. Returns (P, H). Because
    ||(P - A) U||^2 = <P^T P, G> - 2 <P, A G> + <A, A G>, the per-program part P^T P is computed once per
    example whatever the head, and every (program, head) pair is two matrix products."""
    if not (len(predicted) == len(actual) == len(grams)) or not actual:
        raise ValueError("output_error_table: need three equally long non-empty lists")
    total = None
    for p, a, g in zip(predicted, actual, grams):
        n = int(round((np.sqrt(8 * p.shape[-1] + 1) - 1) / 2))
        rows, cols = matrices.tril_indices(n)
        A = _unpack_rows(a, n)
        G = np.stack([matrices.unpack_symmetric(row, n) for row in np.asarray(g)])     # (H, n, n)
        AG = A @ G
        own = np.einsum("hij,hij->h", A, AG)                                            # <A, A G>
        flat_G, packed_AG = G.reshape(len(G), -1), AG[:, rows, cols]
        uniform = (1.0 / (rows + 1.0))[None]                                             # packed, row i: 1/(i+1)
        base = _squared_errors(uniform, n, flat_G, packed_AG, own)[0]
        errors = np.concatenate([_squared_errors(np.asarray(p[s:s + chunk], dtype=np.float64), n, flat_G,
                                                 packed_AG, own) for s in range(0, len(p), chunk)])
        ratio = np.sqrt(np.maximum(errors, 0) / np.maximum(base, 1e-30)[None])
        total = ratio if total is None else total + ratio
    return total / len(actual)


def _squared_errors(packed: np.ndarray, n: int, flat_G: np.ndarray, packed_AG: np.ndarray, own: np.ndarray):
    """(P, H) ||(P - A) U||^2 for P packed programs, given each head's G (flattened), A G (at the lower
    triangle's entries) and <A, A G>."""
    P = _unpack_rows(packed, n)
    gram_of_program = np.matmul(P.transpose(0, 2, 1), P).reshape(len(P), -1)          # P^T P
    return gram_of_program @ flat_G.T - 2 * packed @ packed_AG.T + own[None]


def _unpack_rows(packed: np.ndarray, n: int) -> np.ndarray:
    """(K, d) packed lower triangles -> (K, n, n) float64."""
    out = np.zeros((len(packed), n, n))
    rows, cols = matrices.tril_indices(n)
    out[:, rows, cols] = packed
    return out


def _l1_distances(p: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(P, H) L1 distances between the rows of p and of a. One head (a per-head job) needs no more than
    numpy; many use scipy's cdist, imported only then (it takes seconds to import on a busy machine)."""
    if len(a) == 1:
        return np.abs(p - a).sum(axis=1, keepdims=True)
    from scipy.spatial.distance import cdist

    return cdist(p, a, "cityblock")


def jsd_rows_flat(p: np.ndarray, a: np.ndarray, n: int) -> np.ndarray:
    """Mean row Jensen-Shannon distance between flattened lower triangles, broadcasting over leading axes:
    p (..., d) and a (..., d) with d = n (n + 1) / 2."""
    m = (p + a) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / m), 0.0) + np.where(a > 0, a * np.log2(a / m), 0.0)
    per_row = np.add.reduceat(terms / 2, matrices.row_starts(n), axis=-1)
    return np.sqrt(np.clip(per_row, 0.0, 1.0)).mean(axis=-1)


def baseline_matrices(n: int, seed: int) -> dict[str, np.ndarray]:
    """The paper's baselines for one example of n tokens, each row-stochastic and lower-triangular:
    random_token (each row attends to one random earlier-or-same token), random_column (one random
    position j0 for the whole example: rows i >= j0 attend to it, earlier rows to themselves), uniform
    (each row spread evenly over j <= i) and first_token (everything on token 0)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    random_token = np.zeros((n, n))
    random_token[rows, rng.integers(0, rows + 1)] = 1.0
    j0 = int(rng.integers(0, n))
    random_column = np.zeros((n, n))
    random_column[rows, np.where(rows >= j0, j0, rows)] = 1.0
    uniform = matrices.uniform(n).astype(np.float64)
    first = np.zeros((n, n))
    first[:, 0] = 1.0
    return {"random_token": random_token, "random_column": random_column, "uniform": uniform,
            "first_token": first}
