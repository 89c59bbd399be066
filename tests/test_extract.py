"""Extraction stores exactly the attention the model returns, for MHA (GPT-2), GQA (Llama) and Gemma-3, and
the per-head bundle holds the same numbers; value Grams (the output objective) are what the weights give."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from attnprog import data, extract, models
from attnprog.contracts import ATTENTION, EXAMPLES, SPLITS, VALUE_GRAMS, ContractError, HeadId, HeadInputs
from attnprog.matrices import split_packed, unpack, unpack_symmetric
from tinyworld import tiny_config


def _examples(folder, n=6):
    info = models.describe_model("tiny", {"local_dir": str(folder)})
    tokenizer = models.load_tokenizer(info)
    corpus = tiny_config({})["corpus"] | {"n_synth": n // 3, "n_val": n // 3, "n_test": n - 2 * (n // 3)}
    examples, _ = data.build_corpus(corpus, tokenizer)
    return info, tokenizer, examples


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3", "qwen2"])
def test_stored_attention_equals_model_output(kind, tiny_models, tmp_path):
    info, tokenizer, examples = _examples(tiny_models[kind])
    model = models.load_model(info, "cpu")
    # batch_size 4 with examples of different lengths exercises padding
    files = extract.extract_attention(model, examples, tmp_path, batch_size=4, pad_id=tokenizer.pad_token_id,
                                      progress=False)
    assert [f.name for f in files] == ["layer0.parquet", "layer1.parquet"]
    stored = [extract.read_attention(path) for path in files]
    for row in examples.itertuples():
        with torch.no_grad():
            out = model(torch.tensor([row.input_ids]), output_attentions=True)
        for layer in range(2):
            for head in range(4):
                matrix = unpack(stored[layer][head, row.example_id], len(row.input_ids))
                expected = out.attentions[layer][0, head].numpy()
                np.testing.assert_allclose(matrix, expected, atol=1e-5)
                np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-5)


def test_layer_file_layout_and_head_inputs(tiny_models, tmp_path):
    info, tokenizer, examples = _examples(tiny_models["llama"])
    model = models.load_model(info, "cpu")
    extract.extract_attention(model, examples, tmp_path / "attention", batch_size=3, pad_id=tokenizer.pad_token_id,
                              progress=False)
    table = ATTENTION.read(tmp_path / "attention" / "layer1.parquet")
    assert len(table) == len(examples) * 4  # one row per (example, head)
    lengths = dict(zip(examples.example_id, examples.input_ids.map(len)))
    for row in table.itertuples():
        assert row.n == lengths[row.example_id]
        assert len(row.attention) == row.n * (row.n + 1) // 2
    assert not list((tmp_path / "attention").glob(".*tmp"))  # no temporary files left behind

    EXAMPLES.write(examples, tmp_path / "examples.parquet")
    extract.write_head_inputs(tmp_path / "attention", tmp_path / "examples.parquet", tmp_path / "head_inputs.npz")
    bundle = HeadInputs(tmp_path / "head_inputs.npz")
    one_head = extract.read_attention(tmp_path / "attention" / "layer1.parquet", heads=[2])
    for split in SPLITS:
        part = bundle.examples(split)
        assert part.example_ids == sorted(examples.loc[examples.split == split, "example_id"])
        for e, triangle in zip(part.example_ids, split_packed(bundle.attention(HeadId(1, 2), split), part.lengths)):
            np.testing.assert_array_equal(triangle, one_head[2, e])


def test_extraction_killed_after_a_written_batch_leaves_no_layer_file(tiny_models, tmp_path, monkeypatch):
    info, tokenizer, examples = _examples(tiny_models["gpt2"])
    model = models.load_model(info, "cpu")
    broken = examples.copy()
    longest = max(map(len, examples["input_ids"])) + 5  # sorts into the last batch, after others were written
    broken.loc[len(broken)] = {"example_id": 99, "split": "test", "text": "x", "input_ids": [10**6] * longest,
                               "tokens": ["x"] * longest}  # an id outside the vocabulary fails there
    written = []
    real_writer = extract.pq.ParquetWriter

    class CountingWriter(real_writer):
        def write_batch(self, batch, *args, **kwargs):
            written.append(batch.num_rows)
            return super().write_batch(batch, *args, **kwargs)

    monkeypatch.setattr(extract.pq, "ParquetWriter", CountingWriter)
    with pytest.raises(Exception):
        extract.extract_attention(model, broken, tmp_path, batch_size=2, pad_id=0, progress=False)
    assert written, "the failure came before any batch was written"
    assert list(tmp_path.iterdir()) == []


def test_read_attention_filters_heads_and_examples(tiny_models, tmp_path):
    info, tokenizer, examples = _examples(tiny_models["llama"])
    model = models.load_model(info, "cpu")
    files = extract.extract_attention(model, examples, tmp_path, batch_size=4, pad_id=tokenizer.pad_token_id,
                                      progress=False)
    ids = examples["example_id"].tolist()[:2]
    some = extract.read_attention(files[0], heads=[1, 3], example_ids=ids)
    assert sorted(some) == sorted((h, e) for h in (1, 3) for e in ids)
    everything = extract.read_attention(files[0])
    for key, triangle in some.items():
        np.testing.assert_array_equal(triangle, everything[key])
    assert pq.read_schema(files[0]).equals(ATTENTION.schema, check_metadata=False)


def _value_vectors_by_hand(model, kind, input_ids):
    """Per layer, (heads, n, width): every head's value vectors projected by its slice of the output
    projection, computed from the weights and the hidden states (not from the recorder's hooks)."""
    with torch.no_grad():
        return _by_hand(model, kind, model(input_ids, output_hidden_states=True).hidden_states)


def _by_hand(model, kind, hidden):
    config = model.config.get_text_config()
    n_heads = config.num_attention_heads
    out = []
    for layer in range(config.num_hidden_layers):
        if kind == "gpt2":
            block = model.transformer.h[layer]
            x = block.ln_1(hidden[layer])[0]
            width = x.shape[-1]
            v = x @ block.attn.c_attn.weight[:, 2 * width:] + block.attn.c_attn.bias[2 * width:]
            d = width // n_heads
            out.append(torch.stack([v[:, h * d:(h + 1) * d] @ block.attn.c_proj.weight[h * d:(h + 1) * d, :]
                                    for h in range(n_heads)]))
        else:
            block = model.model.layers[layer]
            x = block.input_layernorm(hidden[layer])[0]
            v = block.self_attn.v_proj(x)
            w_o = block.self_attn.o_proj.weight
            d = w_o.shape[1] // n_heads
            group = n_heads // config.num_key_value_heads
            out.append(torch.stack([v[:, (h // group) * d:(h // group + 1) * d] @ w_o[:, h * d:(h + 1) * d].T
                                    for h in range(n_heads)]))
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3", "qwen2"])
def test_value_grams_equal_projected_values_by_hand(kind, tiny_models, tmp_path):
    """G = U U^T from the weights, for fused qkv (GPT-2) and grouped-query attention (Llama, Gemma-3: 4 heads
    over 2 key/value groups); recorded in the same forward pass as the attention, which stays as it was."""
    info, tokenizer, examples = _examples(tiny_models[kind])
    model = models.load_model(info, "cpu")
    files = extract.extract_attention(model, examples, tmp_path / "attention", batch_size=4,
                                      pad_id=tokenizer.pad_token_id, progress=False, grams_dir=tmp_path / "grams")
    alone = extract.extract_attention(model, examples, tmp_path / "alone", batch_size=4,
                                      pad_id=tokenizer.pad_token_id, progress=False)
    for with_grams, without in zip(files, alone):
        assert extract.read_attention(with_grams).keys() == extract.read_attention(without).keys()
        for key, triangle in extract.read_attention(with_grams).items():
            np.testing.assert_array_equal(triangle, extract.read_attention(without)[key])
    grams = [extract.read_attention(tmp_path / "grams" / f"layer{layer}.parquet", table=VALUE_GRAMS)
             for layer in range(2)]
    assert pq.read_schema(tmp_path / "grams" / "layer0.parquet").equals(VALUE_GRAMS.schema, check_metadata=False)
    for row in examples.itertuples():
        n = len(row.input_ids)
        for layer, U in enumerate(_value_vectors_by_hand(model, kind, torch.tensor([row.input_ids]))):
            for head in range(4):
                expected = (U[head] @ U[head].T).numpy()
                stored = unpack_symmetric(grams[layer][head, row.example_id], n)
                np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_head_inputs_carry_value_grams_only_when_recorded(tiny_models, tmp_path):
    info, tokenizer, examples = _examples(tiny_models["llama"])
    model = models.load_model(info, "cpu")
    extract.extract_attention(model, examples, tmp_path / "attention", batch_size=3, pad_id=tokenizer.pad_token_id,
                              progress=False, grams_dir=tmp_path / "grams")
    EXAMPLES.write(examples, tmp_path / "examples.parquet")
    extract.write_head_inputs(tmp_path / "attention", tmp_path / "examples.parquet", tmp_path / "plain.npz")
    extract.write_head_inputs(tmp_path / "attention", tmp_path / "examples.parquet", tmp_path / "with.npz",
                              tmp_path / "grams")
    plain, with_grams = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "with.npz")
    assert not any(key.startswith("gram_") for key in plain.files)
    assert sorted(plain.files) == sorted(key for key in with_grams.files if not key.startswith("gram_"))
    for key in plain.files:
        np.testing.assert_array_equal(plain[key], with_grams[key])
    stored = extract.read_attention(tmp_path / "grams" / "layer1.parquet", heads=[3], table=VALUE_GRAMS)
    for split in SPLITS:
        part = HeadInputs(tmp_path / "with.npz").examples(split)
        flat = HeadInputs(tmp_path / "with.npz").value_grams(HeadId(1, 3), split)
        for e, triangle in zip(part.example_ids, split_packed(flat, part.lengths)):
            np.testing.assert_array_equal(triangle, stored[3, e])
    with pytest.raises(ContractError, match="objective: output"):
        HeadInputs(tmp_path / "plain.npz").value_grams(HeadId(1, 3), "synth")


def test_value_grams_of_another_architecture_are_a_clear_error():
    from transformers import AutoModelForCausalLM, OPTConfig

    model = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, ffn_dim=32))
    with pytest.raises(ValueError, match=r"OPTForCausalLM \(model_type 'opt'\).*objective: iou"):
        extract.ValueGramRecorder(model)
