import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from attnprog import matrices, scoring


def random_attention(rng, n, sharp=1.0):
    a = np.tril(rng.random((n, n)) ** (1 / sharp))
    return a / a.sum(axis=1, keepdims=True)


def test_soft_iou_known_values():
    a = np.array([[1.0, 0.0], [0.5, 0.5]])
    b = np.array([[1.0, 0.0], [1.0, 0.0]])
    # min sums to 1 + 0.5, max to 1 + 1 + 0.5
    assert scoring.soft_iou(a, b) == pytest.approx(1.5 / 2.5)
    assert scoring.soft_iou(a, a) == 1.0
    assert scoring.soft_iou(np.eye(3), np.tril(np.ones((3, 3)), -1)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        scoring.soft_iou(a, np.eye(3))


def test_row_jsd_known_values_and_scipy():
    a = np.array([[1.0, 0.0], [0.5, 0.5]])
    b = np.array([[1.0, 0.0], [1.0, 0.0]])
    # row 1: m = (0.75, 0.25); JS = (KL(a|m) + KL(b|m)) / 2 in bits
    js = (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25) + np.log2(1 / 0.75)) / 2
    assert scoring.row_jsd(a, b) == pytest.approx(np.sqrt(js) / 2)
    assert scoring.row_jsd(a, a) == 0.0
    rng = np.random.default_rng(0)
    p, q = random_attention(rng, 7), random_attention(rng, 7)
    naive = np.mean([jensenshannon(p[i, : i + 1], q[i, : i + 1], base=2) for i in range(7)])
    assert scoring.row_jsd(p, q) == pytest.approx(naive, abs=1e-9)
    # disjoint rows are the farthest apart: distance 1
    assert scoring.row_jsd(np.eye(3), np.array([[1.0, 0, 0], [1, 0, 0], [1, 0, 0]])) == pytest.approx(2 / 3)


def test_iou_table_equals_naive_loop():
    rng = np.random.default_rng(1)
    lengths = [3, 8, 5]
    programs = [[random_attention(rng, n, sharp=s) for n in lengths] for s in (0.3, 1, 3, 10)]
    heads = [[random_attention(rng, n, sharp=s) for n in lengths] for s in (0.5, 2, 4)]
    table = scoring.iou_table(
        [np.stack([matrices.pack(p[e]) for p in programs]) for e in range(len(lengths))],
        [np.stack([matrices.pack(h[e]) for h in heads]) for e in range(len(lengths))])
    naive = np.array([[scoring.mean_iou(p, h) for h in heads] for p in programs])
    assert table.shape == (4, 3)
    np.testing.assert_allclose(table, naive, atol=1e-12)


def test_jsd_rows_flat_equals_row_jsd():
    rng = np.random.default_rng(2)
    p, q = random_attention(rng, 9, 3), random_attention(rng, 9, 0.5)
    flat = scoring.jsd_rows_flat(matrices.pack(p), matrices.pack(q), 9)
    assert flat == pytest.approx(scoring.row_jsd(p, q), abs=1e-12)
    many = scoring.jsd_rows_flat(np.stack([matrices.pack(p), matrices.pack(q)]),
                                 matrices.pack(q)[None, :], 9)
    np.testing.assert_allclose(many, [scoring.row_jsd(p, q), 0.0], atol=1e-12)


def test_mean_scores_check_lengths():
    with pytest.raises(ValueError, match="equally long"):
        scoring.mean_iou([np.eye(2)], [])
    with pytest.raises(ValueError, match="equally long"):
        scoring.iou_table([np.ones((1, 3))], [np.ones((1, 3)), np.ones((1, 3))])


def test_baselines():
    n = 12
    b = scoring.baseline_matrices(n, seed=3)
    assert set(b) == set(scoring.BASELINE_NAMES)
    for name, m in b.items():
        np.testing.assert_allclose(m.sum(axis=1), 1.0, err_msg=name)
        assert np.all(np.triu(m, k=1) == 0), name
    assert np.all((b["random_token"] > 0).sum(axis=1) == 1)
    column = b["random_column"]
    j0 = int(np.argmax(column[-1]))
    assert np.all(column[j0:, j0] == 1) and np.all(np.diag(column)[:j0] == 1)
    np.testing.assert_allclose(b["uniform"][3, :4], 0.25)
    assert np.all(b["first_token"][:, 0] == 1)
    # seeded: the same example gets the same draw, another seed (almost surely) another one
    np.testing.assert_array_equal(scoring.baseline_matrices(n, seed=3)["random_token"], b["random_token"])
    others = [scoring.baseline_matrices(n, seed=s)["random_token"] for s in range(4, 8)]
    assert any(not np.array_equal(o, b["random_token"]) for o in others)
    # a pure attention-sink head is matched exactly by first_token, not by uniform
    sink = np.zeros((n, n))
    sink[:, 0] = 1
    assert scoring.soft_iou(b["first_token"], sink) == 1.0
    assert scoring.soft_iou(b["uniform"], sink) < 0.5


def test_output_error_table_matches_the_output_fits_definition():
    """Every (program, head) entry equals output_fit.relative_output_error computed the direct way
    (scatter the error, multiply by G), though the table never forms P - A."""
    from attnprog import matrices
    from attnprog.scoring import output_error_table
    from attnprog.synthesize.fit import split_data
    from attnprog.synthesize.output_fit import ValueGrams, relative_output_error

    rng = np.random.default_rng(0)
    lengths = [5, 8, 3]

    def attention(n):
        m = np.tril(rng.random((n, n)) ** 4)
        return matrices.pack(m / m.sum(axis=1, keepdims=True))

    def gram(n):
        values = rng.normal(size=(n, 4))
        return matrices.pack(values @ values.T)

    heads = [np.stack([attention(n) for _ in range(2)]) for n in lengths]
    grams = [np.stack([gram(n) for _ in range(2)]) for n in lengths]
    programs = [np.stack([attention(n) for _ in range(3)] + [a[0]]) for a, n in zip(heads, lengths)]
    table = output_error_table(programs, heads, grams, chunk=2)
    assert table.shape == (4, 2) and table[3, 0] == pytest.approx(0, abs=1e-6)  # head 0's own attention
    for h in range(2):
        data = split_data(np.zeros((sum(len(a[h]) for a in heads), 1)), lengths, np.concatenate([a[h] for a in heads]))
        direct = ValueGrams(np.concatenate([g[h] for g in grams]), data)
        for p in range(4):
            expected = relative_output_error(np.concatenate([q[p] for q in programs]), data, direct)
            assert table[p, h] == pytest.approx(expected, rel=1e-9, abs=1e-9)
