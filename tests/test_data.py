"""The corpus: sentence chunking, a disjoint and stable split, token strings that join back to the text."""
import pandas as pd
import pytest

from attnprog import data, models
from tinyworld import tiny_config


@pytest.fixture
def tokenizer(tiny_models):
    return models.load_tokenizer(models.describe_model("llama", {"local_dir": str(tiny_models["llama"])}))


def corpus(**changes):
    return tiny_config({})["corpus"] | changes


def test_chunks_are_whole_sentences_within_limits():
    text = "One two three. Four five six seven! Eight nine ten eleven twelve? Thirteen."
    chunks = data.chunk_passage(text, min_words=3, max_words=6)
    # greedy packing: a sentence joins the current chunk while the chunk stays within max_words
    assert chunks == ["One two three.", "Four five six seven!", "Eight nine ten eleven twelve? Thirteen."]
    assert all(3 <= len(c.split()) <= 6 for c in chunks)


def test_long_sentence_is_dropped_not_cut():
    assert data.chunk_passage("a b c d e f g h i j.", min_words=2, max_words=5) == []


def test_split_counts_disjoint_and_stable(tokenizer):
    examples, heldout = data.build_corpus(corpus(n_synth=5, n_val=4, n_test=3), tokenizer)
    assert examples["split"].value_counts().to_dict() == {"synth": 5, "val": 4, "test": 3}
    assert examples["text"].is_unique
    assert not set(examples["text"]) & set(" ".join(heldout["text"]).split("\n"))
    for text in examples["text"]:
        assert not any(text in h for h in heldout["text"])  # held-out text never contains an example
    again, _ = data.build_corpus(corpus(n_synth=5, n_val=4, n_test=3), tokenizer)
    pd.testing.assert_frame_equal(examples, again)
    other, _ = data.build_corpus(corpus(n_synth=5, n_val=4, n_test=3, seed=1), tokenizer)
    assert list(other["text"]) != list(examples["text"])


def test_heldout_has_requested_tokens(tokenizer):
    _, heldout = data.build_corpus(corpus(heldout_tokens=300), tokenizer)
    assert heldout["input_ids"].map(len).sum() >= 300
    assert set(heldout["split"]) == {"heldout"}


def test_token_strings_join_to_text(tokenizer):
    examples, _ = data.build_corpus(corpus(), tokenizer)
    for row in examples.itertuples():
        assert len(row.tokens) == len(row.input_ids)
        assert row.tokens[0] == "<s>"  # the llama-style tokenizer's BOS, literally
        assert "".join(row.tokens[1:]) == row.text


def test_token_strings_keep_leading_spaces(tokenizer):
    ids = tokenizer("the cat sat")["input_ids"]
    tokens = data.token_strings(tokenizer, ids)
    assert "".join(tokens) == "<s>the cat sat"
    assert any(t.startswith(" ") for t in tokens)


def test_too_few_passages_is_a_clear_error(tokenizer):
    with pytest.raises(data.CorpusError, match="only .* passages"):
        data.build_corpus(corpus(n_synth=5000), tokenizer)


def test_missing_corpus_file_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(data.CorpusError, match="file not found"):
        data.build_corpus(corpus(source={"files": [str(tmp_path / "nope.txt")]}), tokenizer)


def test_jsonl_source(tokenizer, tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join('{"text": "Passage number %d talks about a cat and a dog that play."}' % i
                              for i in range(30)))
    examples, _ = data.build_corpus(corpus(source={"files": [str(path)]}, n_synth=2, n_val=2, n_test=2,
                                           heldout_tokens=0), tokenizer)
    assert len(examples) == 6
