"""Extraction stores exactly the attention the model returns, for MHA (GPT-2), GQA (Llama) and Gemma-3."""
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from attnprog import data, extract, models
from tinyworld import tiny_config


def _examples(folder, n=6):
    info = {"load_path": str(folder), "dtype": "float32"}
    tokenizer = models.load_tokenizer(info)
    corpus = tiny_config({})["corpus"] | {"n_synth": n // 3, "n_val": n // 3, "n_test": n - 2 * (n // 3)}
    examples, _ = data.build_corpus(corpus, tokenizer)
    return info, tokenizer, examples


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
def test_stored_attention_equals_model_output(kind, tiny_models, tmp_path):
    info, tokenizer, examples = _examples(tiny_models[kind])
    model = models.load_model(info, "cpu")
    # batch_size 4 with examples of different lengths exercises padding
    files = extract.extract_attention(model, examples, tmp_path, batch_size=4, pad_id=tokenizer.pad_token_id,
                                      progress=False)
    assert [f.name for f in files] == ["layer0.parquet", "layer1.parquet"]
    for row in examples.itertuples():
        with torch.no_grad():
            out = model(torch.tensor([row.input_ids]), output_attentions=True)
        for layer, path in enumerate(files):
            for head in range(4):
                stored = extract.read_head_attention(path, head)[row.example_id]
                expected = out.attentions[layer][0, head].numpy()
                np.testing.assert_allclose(stored, expected, atol=1e-5)
                np.testing.assert_allclose(stored.sum(axis=1), 1.0, atol=1e-5)
                assert np.all(np.triu(stored, k=1) == 0)


def test_layer_file_layout(tiny_models, tmp_path):
    info, tokenizer, examples = _examples(tiny_models["llama"])
    model = models.load_model(info, "cpu")
    extract.extract_attention(model, examples, tmp_path, batch_size=3, pad_id=tokenizer.pad_token_id,
                              progress=False)
    table = pq.read_table(tmp_path / "layer1.parquet").to_pandas()
    assert len(table) == len(examples) * 4  # one row per (example, head)
    lengths = dict(zip(examples.example_id, examples.input_ids.map(len)))
    for row in table.itertuples():
        assert row.n == lengths[row.example_id]
        assert len(row.attention) == row.n * (row.n + 1) // 2
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_killed_extraction_leaves_no_layer_file(tiny_models, tmp_path):
    info, tokenizer, examples = _examples(tiny_models["gpt2"])
    model = models.load_model(info, "cpu")
    broken = examples.copy()
    broken.loc[len(broken)] = {"example_id": 99, "split": "test", "text": "x", "input_ids": [10**6],
                               "tokens": ["x"]}  # an id outside the vocabulary fails mid-run
    with pytest.raises(Exception):
        extract.extract_attention(model, broken, tmp_path, batch_size=2, pad_id=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dense_roundtrip():
    matrix = np.tril(np.random.default_rng(0).random((5, 5))).astype(np.float32)
    np.testing.assert_array_equal(extract.dense(matrix[np.tril_indices(5)], 5), matrix)
