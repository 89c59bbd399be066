"""The library: pooled candidates, dedup by behaviour, selection on val among causal programs only."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnprog import helpers as h
from attnprog import library, rerank
from attnprog import synthesize as S
from attnprog.extract import SCHEMA

WORDS = [" the", " cat", " dog", " sat", " on", " a", " mat", " and", " ran", " home", ",", " big"]


def make_examples(per_split=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for k, split in enumerate(["synth"] * per_split + ["val"] * per_split + ["test"] * per_split):
        n = int(rng.integers(8, 16))
        tokens = ["The"] + [WORDS[i] for i in rng.integers(0, len(WORDS), n - 2)] + ["."]
        rows.append({"example_id": k, "split": split, "text": "".join(tokens), "input_ids": list(range(n)),
                     "tokens": tokens})
    return pd.DataFrame(rows)


def previous_token(tokens):
    a = np.eye(len(tokens), k=-1)
    a[0, 0] = 1.0
    return a


def first_token(tokens):
    return h.first_token(len(tokens))


def first_and_same(tokens):
    return h.causal_softmax(3.0 * h.first_token(len(tokens)) + 4.0 * h.same_token(tokens))


def write_attention(root, examples, heads_by_layer):
    """heads_by_layer: {layer: [fn or {split: fn}]}; writes results-like layer files."""
    folder = root / "attention"
    folder.mkdir(parents=True)
    for layer, fns in heads_by_layer.items():
        rows = {"example_id": [], "head": [], "n": [], "attention": []}
        for e, split, tokens in zip(examples["example_id"], examples["split"], examples["tokens"]):
            for head, fn in enumerate(fns):
                fn = fn[split] if isinstance(fn, dict) else fn
                m = fn(list(tokens))
                rows["example_id"].append(int(e))
                rows["head"].append(head)
                rows["n"].append(len(tokens))
                rows["attention"].append(m[np.tril_indices(len(tokens))].astype(np.float32).tolist())
        pq.write_table(pa.table(rows, schema=SCHEMA), folder / f"layer{layer}.parquet")
    return folder


def write_candidates(folder, sources: dict[str, str]):
    folder.mkdir(parents=True)
    candidates = []
    for name, source in sources.items():
        (folder / f"{name}.py").write_text(source)
        candidates.append({"name": name, "file": f"{name}.py", "origin": "offline", "status": "ok", "error": None,
                           "synth_jsd": None, "refined_from": None, "prompt_hash": None, "input_tokens": 0,
                           "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": 0.0})
    (folder / "manifest.json").write_text(json.dumps({"backend": "offline", "candidates": candidates}))


PREVIOUS = '''"""Attends to the previous token."""
import numpy as np
from attnprog import helpers as h

def attention(tokens):
    n = len(tokens)
    return h.causal_softmax(20.0 * h.offset(n, 1))
'''
MOSTLY_PREVIOUS = '''"""Attends mostly to the previous token, a little to itself."""
import numpy as np
from attnprog import helpers as h

def attention(tokens):
    n = len(tokens)
    return h.causal_softmax(20.0 * h.offset(n, 1) + 18.6 * h.offset(n, 0))
'''
FIRST = '''"""Attends to the first token."""
import numpy as np
from attnprog import helpers as h

def attention(tokens):
    return h.causal_softmax(20.0 * h.first_token(len(tokens)))
'''
PEEKING = '''"""Previous token when the text ends with a full stop (looks at the end of the text: not causal)."""
import numpy as np
from attnprog import helpers as h

def attention(tokens):
    n = len(tokens)
    if tokens[-1] == ".":
        return h.causal_softmax(20.0 * h.offset(n, 1))
    return h.causal_softmax(np.zeros((n, n)))
'''


def run_library(root, examples, heads, candidate_dirs):
    examples_path = root / "examples.parquet"
    examples.to_parquet(examples_path)
    if not (root / "head_inputs.npz").exists():
        S.write_head_inputs(root / "attention", examples_path, root / "head_inputs.npz")
    tables = {}
    for (layer, head), folder in candidate_dirs.items():
        tables[(layer, head)] = root / "rerank" / f"L{layer}H{head}.parquet"
        rerank.rerank_head(folder, root / "head_inputs.npz", layer, head, tables[(layer, head)])
    summary = library.build_library("tiny", heads, candidate_dirs, tables, root / "attention", examples_path,
                                    root / "library", {"causal_check_examples": 3})
    return summary, {name: pd.read_parquet(root / "library" / f"{name}.parquet")
                     for name in ("programs", "scores", "best", "baselines")}


def test_library_from_synthesized_candidates(tmp_path):
    examples = make_examples()
    write_attention(tmp_path, examples, {0: [previous_token, first_and_same], 1: [first_token, previous_token]})
    examples.to_parquet(tmp_path / "examples.parquet")
    S.compute_features(examples, tmp_path / "features.npz", n_words=4)
    S.write_head_inputs(tmp_path / "attention", tmp_path / "examples.parquet", tmp_path / "head_inputs.npz")
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    dirs = {}
    for layer, head in heads:
        dirs[(layer, head)] = tmp_path / "synthesis" / f"L{layer}H{head}"
        S.synthesize_head({"backend": "offline", "offline": {"sizes": [1, 2, 4]}}, "tiny", layer, head,
                          tmp_path / "head_inputs.npz", dirs[(layer, head)], tmp_path / "features.npz")
    summary, tables = run_library(tmp_path, examples, heads, dirs)

    assert summary["n_heads"] == 4
    # L0H0 and L1H1 are the same head: their candidates behave the same and are kept once
    assert summary["library_size"] < summary["n_candidates"]
    assert summary["library_size"] == len(tables["programs"]) == len(list((tmp_path / "library/programs").glob("*.py")))
    assert list(tables["programs"].columns) == ["name", "origin", "source_layer", "source_head", "description",
                                                "category", "causal", "trusted"]
    assert list(tables["best"].columns) == ["layer", "head", "program", "val_iou", "test_iou", "synth_iou", "causal"]
    assert set(tables["scores"]["split"]) == {"synth", "val", "test"}
    # val and test: every program on every head; synth: each head's chosen program
    assert len(tables["scores"]) == 2 * 4 * summary["library_size"] + 4
    assert (tables["best"]["val_iou"] > 0.9).all() and (tables["best"]["test_iou"] > 0.9).all()
    assert summary["mean_test_iou"] == pytest.approx(tables["best"]["test_iou"].mean())
    assert set(summary["baselines"]) == {"random_token", "random_column", "uniform", "first_token"}
    assert summary["baselines"]["first_token"] < summary["mean_test_iou"]
    assert set(summary["per_layer_test_iou"]) == {"0", "1"}
    # the best program's recorded scores agree with the full score table
    best = tables["best"].iloc[0]
    scores = tables["scores"].set_index(["program", "layer", "head", "split"])["iou"]
    assert scores[(best["program"], best["layer"], best["head"], "val")] == pytest.approx(best["val_iou"])
    assert scores[(best["program"], best["layer"], best["head"], "synth")] == pytest.approx(best["synth_iou"])
    assert best["synth_iou"] > 0.9
    assert tables["programs"]["category"].notna().all()


def test_selection_uses_val_not_test(tmp_path):
    examples = make_examples()
    # On val the head attends to the previous token; on synth and test to the first token.
    write_attention(tmp_path, examples, {0: [{"synth": first_token, "val": previous_token, "test": first_token}]})
    write_candidates(tmp_path / "synthesis" / "L0H0", {"prev": PREVIOUS, "first": FIRST})
    summary, tables = run_library(tmp_path, examples, [(0, 0)], {(0, 0): tmp_path / "synthesis" / "L0H0"})
    best = tables["best"].iloc[0]
    assert best["program"] == "prev"
    assert best["val_iou"] > 0.9 and best["test_iou"] < 0.5
    scores = tables["scores"].set_index(["program", "split"])["iou"]
    assert scores[("first", "test")] > best["test_iou"]  # test would have chosen the other one


def test_only_causal_programs_are_chosen(tmp_path):
    examples = make_examples()
    write_attention(tmp_path, examples, {0: [previous_token]})
    write_candidates(tmp_path / "synthesis" / "L0H0", {"peek": PEEKING, "mostly_prev": MOSTLY_PREVIOUS})
    summary, tables = run_library(tmp_path, examples, [(0, 0)], {(0, 0): tmp_path / "synthesis" / "L0H0"})
    programs = tables["programs"].set_index("name")
    assert not programs.loc["peek", "causal"] and programs.loc["mostly_prev", "causal"]
    scores = tables["scores"].set_index(["program", "split"])["iou"]
    assert scores[("peek", "val")] > scores[("mostly_prev", "val")]  # the peeking one fits better...
    best = tables["best"].iloc[0]
    assert best["program"] == "mostly_prev" and bool(best["causal"])  # ...but cannot be substituted


def test_failed_candidates_score_worst_and_stay_out(tmp_path):
    examples = make_examples()
    write_attention(tmp_path, examples, {0: [previous_token]})
    write_candidates(tmp_path / "synthesis" / "L0H0",
                     {"prev": PREVIOUS, "broken": '"""Divides by zero."""\ndef attention(tokens):\n    return 1 / 0\n'})
    summary, tables = run_library(tmp_path, examples, [(0, 0)], {(0, 0): tmp_path / "synthesis" / "L0H0"})
    ranked = pd.read_parquet(tmp_path / "rerank" / "L0H0.parquet").set_index("name")
    assert ranked.loc["broken", "status"] != "ok" and ranked.loc["broken", "val_iou"] == 0.0
    assert ranked.loc["prev", "status"] == "ok" and ranked.loc["prev", "val_iou"] > 0.99
    assert list(tables["programs"]["name"]) == ["prev"]
