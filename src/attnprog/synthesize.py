"""The offline synthesizer: readable attention programs fitted to a head, with no LLM.

A program scores every earlier token j for token i with a weighted sum of readable primitives, and
attention is the softmax of that score over j <= i:

    score(i, j) = 4.2 * [j is the first token] + 2.1 * [j = i - 1] - 0.8 * log(1 + i - j) + ...

Each primitive is one expression over `attnprog.helpers` (FEATURES below), causal by construction. The
weights are fitted to the head's synth-split attention by minimising the row cross-entropy between the
head's rows and the program's rows: soft-label multinomial logistic regression, which is convex, solved
with Newton's method, then polished for IoU. Primitives are chosen by greedy forward selection (each step
adds the primitive whose weight the loss gradient pulls on hardest, then refits), so the candidates for one
head come in increasing sizes (1, 2, 4, 8, 16 primitives by default): short programs and accurate ones.
Rerank and library choose among them on val.

Per-head jobs are kept light (a model has hundreds of heads, and each job is a new process): once per
model, `write_head_inputs` (rule `head_inputs`) gathers every head's synth and val attention with the
examples' tokens into one .npz, and `compute_features` (rule `synth_features`) computes every primitive on
every example, so a head's job imports numpy and loads two arrays.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import helpers
from .atomic import atomic_dir, atomic_path, write_json

SPLITS_USED = ("synth", "val")


@dataclass(frozen=True)
class Feature:
    name: str
    expression: str  # numpy / helpers (as `h`) code over `tokens` and `n`, giving an n x n matrix
    description: str  # plain English: what [i, j] is


FEATURES = [
    Feature("first", "h.first_token(n)", "j is the first token"),
    Feature("first_log_position", "h.first_token(n) * h.log_position(n)",
            "j is the first token, times log(1 + i) (a pull to the first token that grows along the text)"),
    Feature("self", "h.offset(n, 0)", "j is the token itself"),
    Feature("previous", "h.offset(n, 1)", "j is the previous token (j = i - 1)"),
    Feature("back_2", "h.offset(n, 2)", "j = i - 2"),
    Feature("back_3", "h.offset(n, 3)", "j = i - 3"),
    Feature("back_4", "h.offset(n, 4)", "j = i - 4"),
    Feature("log_distance", "h.log_distance(n)", "log(1 + i - j), how far back j is"),
    Feature("distance", "h.distance(n)", "i - j, how many tokens back j is"),
    Feature("second", "h.key_is(h.positions(tokens) == 1)", "j is the second token"),
    Feature("third", "h.key_is(h.positions(tokens) == 2)", "j is the third token"),
    Feature("key_first_occurrence", "h.key_is(h.is_first_occurrence(tokens))",
            "token j is the first of its kind in the text"),
    Feature("log_key_position", "np.log1p(h.key_is(h.positions(tokens)))", "log(1 + j), how far into the text j is"),
    Feature("key_punctuation", "h.key_is(h.is_punctuation(tokens))", "token j is punctuation"),
    Feature("key_sentence_end", "h.key_is(h.is_sentence_end(tokens))", "token j ends a sentence"),
    Feature("key_comma", "h.key_is(h.is_token(tokens, ','))", "token j is a comma"),
    Feature("key_stopword", "h.key_is(h.is_stopword(tokens))", "token j is a function word (the, and, of, ...)"),
    Feature("key_capitalized", "h.key_is(h.is_capitalized(tokens))", "token j is capitalized"),
    Feature("key_number", "h.key_is(h.is_number(tokens))", "token j is a number"),
    Feature("key_word_start", "h.key_is(h.is_word_start(tokens))", "token j starts a word"),
    Feature("key_determiner", "h.key_is(h.is_token(tokens, 'the', 'a', 'an'))", "token j is 'the', 'a' or 'an'"),
    Feature("same_token", "h.same_token(tokens)", "token j is an earlier copy of token i"),
    Feature("induction", "h.induction(tokens)", "token j follows an earlier copy of token i (induction)"),
    Feature("previous_occurrence", "h.previous_occurrence_matrix(tokens)",
            "j is the most recent earlier copy of token i"),
    Feature("same_word", "h.same_word(tokens)", "j is in the same word as i"),
    Feature("same_sentence", "h.same_sentence(tokens)", "j is in the same sentence as i"),
    Feature("start_of_word", "h.start_of_word(tokens)", "j is the first token of i's word"),
    Feature("start_of_sentence", "h.start_of_sentence(tokens)", "j is the first token of i's sentence"),
    Feature("previous_word", "h.previous_word(tokens)", "j is in the word before i's word"),
    Feature("last_punctuation", "h.most_recent(h.is_punctuation(tokens))", "j is the last punctuation up to i"),
    Feature("last_sentence_end", "h.most_recent(h.is_sentence_end(tokens))",
            "j is the last sentence end up to i"),
    Feature("self_if_punctuation", "h.offset(n, 0) * h.query_is(h.is_punctuation(tokens))",
            "j is i itself and i is punctuation"),
    Feature("self_if_word_start", "h.offset(n, 0) * h.query_is(h.is_word_start(tokens))",
            "j is i itself and i starts a word"),
    Feature("previous_if_inside_word", "h.offset(n, 1) * h.query_is(~h.is_word_start(tokens))",
            "j is the previous token and i continues a word"),
    Feature("previous_if_punctuation", "h.offset(n, 1) * h.key_is(h.is_punctuation(tokens))",
            "j is the previous token and j is punctuation"),
    Feature("first_if_punctuation", "h.first_token(n) * h.query_is(h.is_punctuation(tokens))",
            "j is the first token and i is punctuation"),
    Feature("first_if_stopword", "h.first_token(n) * h.query_is(h.is_stopword(tokens))",
            "j is the first token and i is a function word"),
]


def word_features(examples, count: int) -> list[Feature]:
    """One primitive "token j is <word>" for each of the `count` most frequent token texts of the synth
    split: heads often park attention on particular tokens ('the', ',', '.')."""
    import pandas as pd

    synth = examples[examples["split"] == "synth"]
    counts = pd.Series([helpers.normalise(t) for tokens in synth["tokens"] for t in tokens]).value_counts()
    counts = counts[counts.index != ""]
    words = sorted(counts.index, key=lambda w: (-counts[w], w))[:count]
    return [Feature(f"key_word_{i}", f"h.key_is(h.is_token(tokens, {w!r}))", f"token j is {w!r}")
            for i, w in enumerate(words)]


def feature_matrix(feature: Feature, tokens: list[str]) -> np.ndarray:
    """One primitive's n x n matrix for one example (the same expression the emitted program runs)."""
    n = len(tokens)
    return np.asarray(eval(feature.expression, {"np": np, "h": helpers}, {"tokens": tokens, "n": n}), dtype=float)


# ---- per model: every primitive on every example, flattened to the lower triangle ----

def compute_features(examples, out_path: str | Path, n_words: int = 24,
                     splits: tuple[str, ...] = SPLITS_USED) -> None:
    """Write an .npz with the primitives (FEATURES plus `word_features`: names, expressions, descriptions)
    and, per split: X_{split} (entries x features, float32, the lower triangles of all examples stacked row
    by row), example_ids_{split} and lengths_{split}."""
    features = FEATURES + word_features(examples, n_words)
    arrays = {"names": np.array([f.name for f in features]),
              "expressions": np.array([f.expression for f in features]),
              "descriptions": np.array([f.description for f in features])}
    for split in splits:
        part = examples[examples["split"] == split].sort_values("example_id")
        if part.empty:
            raise ValueError(f"compute_features: no examples in split '{split}'")
        blocks = []
        for tokens in part["tokens"]:
            tokens = list(tokens)
            rows, cols = np.tril_indices(len(tokens))
            blocks.append(np.stack([feature_matrix(f, tokens)[rows, cols] for f in features], axis=1))
        arrays[f"X_{split}"] = np.concatenate(blocks).astype(np.float32)
        arrays[f"example_ids_{split}"] = part["example_id"].to_numpy(dtype=np.int64)
        arrays[f"lengths_{split}"] = part["tokens"].map(len).to_numpy(dtype=np.int64)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


# ---- per model: every head's synth and val attention, for the per-head jobs ----

def write_head_inputs(attention_dir: str | Path, examples_path: str | Path, out_path: str | Path,
                      splits: tuple[str, ...] = SPLITS_USED) -> None:
    """One .npz with, per split: example_ids_{split}, lengths_{split}, tokens_{split} and texts_{split}
    (JSON), and for every head L{layer}H{head}_{split}: its attention on those examples, lower triangles
    row by row, concatenated (float32). Loading one head reads only its own arrays."""
    import pandas as pd

    from .extract import read_layer_attention

    examples = pd.read_parquet(examples_path)
    layers = sorted(int(p.stem[len("layer"):]) for p in Path(attention_dir).glob("layer*.parquet"))
    if not layers:
        raise ValueError(f"no layer*.parquet files in {attention_dir}")
    arrays = {}
    parts = {s: examples[examples["split"] == s].sort_values("example_id") for s in splits}
    for split, part in parts.items():
        if part.empty:
            raise ValueError(f"no examples in split '{split}' in {examples_path}")
        arrays[f"example_ids_{split}"] = part["example_id"].to_numpy(dtype=np.int64)
        arrays[f"lengths_{split}"] = part["tokens"].map(len).to_numpy(dtype=np.int64)
        arrays[f"tokens_{split}"] = np.array(json.dumps([list(t) for t in part["tokens"]]))
        arrays[f"texts_{split}"] = np.array(json.dumps(list(part["text"])))
    for layer in layers:
        matrices = read_layer_attention(Path(attention_dir) / f"layer{layer}.parquet")
        for head in sorted({h for h, _ in matrices}):
            for split, part in parts.items():
                flat = []
                for example_id, n in zip(part["example_id"], part["tokens"].map(len)):
                    matrix = matrices.get((head, int(example_id)))
                    if matrix is None or matrix.shape != (n, n):
                        raise ValueError(f"L{layer}H{head}: attention for example {int(example_id)} is missing "
                                         f"or not {n} x {n}")
                    flat.append(matrix[np.tril_indices(n)])
                arrays[f"L{layer}H{head}_{split}"] = np.concatenate(flat).astype(np.float32)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


@dataclass
class HeadExamples:
    """One head on one split: the examples (ids, tokens, texts) and the head's n x n matrices."""
    example_ids: list[int]
    tokens: list[list[str]]
    texts: list[str]
    matrices: list[np.ndarray]

    def attention(self) -> dict[int, np.ndarray]:
        return dict(zip(self.example_ids, self.matrices))


def read_head_inputs(path: str | Path, layer: int, head: int, split: str) -> HeadExamples:
    """One head's examples and attention on `split` from the file `write_head_inputs` wrote."""
    with np.load(path) as z:
        key = f"L{layer}H{head}_{split}"
        if key not in z.files:
            raise ValueError(f"{path} has no attention for layer {layer} head {head} on split '{split}'")
        flat, lengths = z[key], z[f"lengths_{split}"]
        ids, tokens, texts = z[f"example_ids_{split}"], json.loads(str(z[f"tokens_{split}"])), \
            json.loads(str(z[f"texts_{split}"]))
    matrices, start = [], 0
    for n in lengths:
        m = np.zeros((n, n), dtype=np.float32)
        size = n * (n + 1) // 2
        m[np.tril_indices(n)] = flat[start:start + size]
        matrices.append(m)
        start += size
    return HeadExamples([int(e) for e in ids], tokens, list(texts), matrices)


@dataclass
class SplitData:
    """One split of one head, flattened: X (D, K) primitives, y (D,) attention, and where rows and
    examples start in the flat arrays."""
    X: np.ndarray
    y: np.ndarray
    row_starts: np.ndarray
    example_starts: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.row_starts)


def split_data(features: dict, split: str, attention: dict[int, np.ndarray]) -> SplitData:
    """Join the precomputed primitives of a split with one head's matrices ({example_id: n x n})."""
    lengths = features[f"lengths_{split}"]
    y_parts = []
    for example_id, n in zip(features[f"example_ids_{split}"], lengths):
        if int(example_id) not in attention:
            raise ValueError(f"no attention recorded for example {int(example_id)}")
        matrix = attention[int(example_id)]
        if matrix.shape != (n, n):
            raise ValueError(f"example {int(example_id)}: attention is {matrix.shape}, tokens give {n}")
        y_parts.append(matrix[np.tril_indices(n)])
    row_lengths = np.concatenate([np.arange(1, n + 1) for n in lengths])
    row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]])
    example_sizes = lengths * (lengths + 1) // 2
    example_starts = np.concatenate([[0], np.cumsum(example_sizes)[:-1]])
    y = np.concatenate(y_parts).astype(np.float64)
    sums = np.add.reduceat(y, row_starts)  # rows of a softmax sum to 1; make it exact for the loss
    y = y / np.repeat(np.where(sums > 0, sums, 1.0), row_lengths)
    return SplitData(np.asarray(features[f"X_{split}"], dtype=np.float64), y, row_starts, example_starts)


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


def greedy_fit(data: SplitData, sizes: list[int], l2: float = 1e-3) -> list[tuple[list[int], np.ndarray]]:
    """Forward selection of primitives. Returns, for each size in `sizes`, (chosen columns, weights).

    Columns are rescaled to unit root-mean-square while fitting so one l2 suits all of them; the returned
    weights apply to the unscaled primitives."""
    scale = np.sqrt(np.mean(data.X ** 2, axis=0))
    usable = scale > 0
    Xs = data.X / np.where(usable, scale, 1.0)
    chosen, w, out = [], np.zeros(0), []
    p = row_softmax(np.zeros(len(data.y)), data.row_starts)
    for step in range(1, max(sizes) + 1):
        pull = np.abs(Xs.T @ (p - data.y))
        pull[chosen] = -1.0
        pull[~usable] = -1.0
        best = int(np.argmax(pull))
        if pull[best] <= 1e-9 * data.n_rows:
            break
        chosen.append(best)
        w = fit_weights(Xs[:, chosen], data.y, data.row_starts, l2, start=np.append(w, 0.0))
        p = row_softmax(Xs[:, chosen] @ w, data.row_starts)
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
    sizes = np.diff(np.append(data.example_starts, len(data.y)))
    weight = np.repeat(1.0 / _rows_per_example(sizes), sizes)  # each example counts once, as in the IoU mean
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


def _rows_per_example(sizes: np.ndarray) -> np.ndarray:
    # an example with n tokens has n (n + 1) / 2 lower-triangle entries
    return (np.sqrt(8 * sizes + 1) - 1) / 2


# ---- emitting a fitted candidate as a readable program file ----

def program_source(terms: list[tuple[float, str, str]], title: str, fit_note: str) -> str:
    """The text of a program file. terms: (weight, helpers expression, plain-English description)."""
    terms = sorted(terms, key=lambda t: -abs(t[0]))
    width = max(len(f"{abs(w):.4g}") for w, _, _ in terms)
    signs = [("-" if w < 0 else " ") if k == 0 else ("-" if w < 0 else "+") for k, (w, _, _) in enumerate(terms)]
    formula = "\n".join(f"    {sign} {abs(w):<{width}.4g} * [{d}]" for sign, (w, _, d) in zip(signs, terms))
    body = "\n".join(f"    score += {w:.6g} * {e}  # {d}" for w, e, d in terms)
    cues = f"{len(terms)} weighted cue{'s' if len(terms) > 1 else ''}"
    return f'''"""{title}: softmax of {cues}; strongest: {terms[0][2]} ({terms[0][0]:+.2f}).

Token i gives every token j <= i a score and attends by the softmax of the scores over j:

  score(i, j) =
{formula}

{fit_note}
"""
import numpy as np

from attnprog import helpers as h


def attention(tokens: list[str]) -> np.ndarray:
    n = len(tokens)
    score = np.zeros((n, n))
{body}
    return h.causal_softmax(score)
'''


def _empty_usage() -> dict:
    return {"prompt_hash": None, "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0,
            "cache_write_tokens": 0, "cost_usd": 0.0}


def synthesize_offline(features_path: str | Path, attention: dict[int, np.ndarray], out_dir: str | Path,
                       model: str, layer: int, head: int, settings: dict) -> dict:
    """Fit one head's candidates and write them (program files + manifest.json) into out_dir, atomically.

    settings: the config's `synthesis.offline` section (sizes, l2, polish). Returns the manifest."""
    features = dict(np.load(features_path))
    data = split_data(features, "synth", attention)
    sizes = sorted(set(settings.get("sizes", [1, 2, 4, 8, 16])))
    fits = greedy_fit(data, sizes, l2=settings.get("l2", 1e-3))
    names, expressions, descriptions = features["names"], features["expressions"], features["descriptions"]
    candidates, seen = [], set()
    with atomic_dir(out_dir) as folder:
        for columns, weights in fits:
            X = data.X[:, columns]
            if settings.get("polish", True):
                weights = refine_for_iou(X, weights, data, steps=settings.get("polish_steps", 30))
            weights = np.array([float(f"{w:.6g}") for w in weights])  # exactly what the file will say
            key = tuple(sorted(zip(names[columns], np.round(weights, 3))))
            if key in seen:
                continue
            seen.add(key)
            name = f"L{layer}H{head}_c{len(candidates)}"
            iou = predicted_iou(X, weights, data)
            jsd = _flat_jsd(row_softmax(X @ weights, data.row_starts), data, features["lengths_synth"])
            terms = [(float(w), str(expressions[c]), str(descriptions[c])) for c, w in zip(columns, weights)]
            note = (f"Fitted by attnprog's offline synthesizer to layer {layer}, head {head} of {model} on "
                    f"{len(features['lengths_synth'])} synthesis examples (soft IoU {iou:.3f}, row JS distance "
                    f"{jsd:.3f} there).")
            source = program_source(terms, f"{model} L{layer}H{head}", textwrap.fill(note, 100))
            (Path(folder) / f"{name}.py").write_text(source)
            candidates.append({"name": name, "file": f"{name}.py", "origin": "offline", "status": "ok",
                               "error": None, "synth_jsd": jsd, "synth_iou": iou, "n_terms": len(terms),
                               "refined_from": None, **_empty_usage()})
        manifest = {"model": model, "layer": layer, "head": head, "backend": "offline",
                    "candidates": candidates,
                    "totals": {k: v for k, v in _empty_usage().items() if k != "prompt_hash"}}
        write_json(Path(folder) / "manifest.json", manifest)
    return manifest


def _flat_jsd(p: np.ndarray, data: SplitData, lengths: np.ndarray) -> float:
    from .scoring import jsd_rows_flat

    ends = np.append(data.example_starts[1:], len(p))
    return float(np.mean([jsd_rows_flat(p[a:b], data.y[a:b], int(n))
                          for a, b, n in zip(data.example_starts, ends, lengths)]))


def synthesize_head(settings: dict, model: str, layer: int, head: int, head_inputs: str | Path,
                    out_dir: str | Path, features_path: str | Path | None = None) -> dict:
    """The `synthesize` rule: dispatch on settings["backend"] (the config's `synthesis` section)."""
    synth = read_head_inputs(head_inputs, layer, head, "synth")
    backend = settings.get("backend", "offline")
    if backend == "offline":
        if features_path is None:
            raise ValueError("synthesis backend 'offline' needs the per-model features file")
        return synthesize_offline(features_path, synth.attention(), out_dir, model, layer, head,
                                  settings.get("offline", {}))
    if backend in ("claude", "open_weights"):
        try:
            from .explainers import synthesize_head_with_llm
        except ImportError as e:
            raise RuntimeError(f"synthesis backend '{backend}' needs attnprog.explainers, which failed to "
                               f"import: {e}") from e
        import pandas as pd

        examples = pd.DataFrame({"example_id": synth.example_ids, "split": "synth", "text": synth.texts,
                                 "tokens": synth.tokens})
        return synthesize_head_with_llm(synth.attention(), examples, settings, out_dir, model, layer, head)
    raise ValueError(f"unknown synthesis backend '{backend}' (expected offline, claude or open_weights)")
