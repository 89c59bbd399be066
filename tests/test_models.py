"""Model loading: local folders, describing a model, and clear one-line errors for bad input."""
import pytest

from attnprog import models
from attnprog.contracts import ContractError, ModelInfo


def test_describe_local_models(tiny_models):
    info = models.describe_model("llama", {"local_dir": str(tiny_models["llama"])})
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.is_causal) == (2, 4, 2, True)
    info = models.describe_model("gpt2", {"local_dir": str(tiny_models["gpt2"])})
    assert (info.n_layers, info.n_heads, info.n_kv_heads) == (2, 4, 4)
    info = models.describe_model("gemma3", {"local_dir": str(tiny_models["gemma3"])})
    assert info.model_type == "gemma3_text"


def test_loaded_model_uses_eager_attention(tiny_models):
    model = models.load_model(models.describe_model("gpt2", {"local_dir": str(tiny_models["gpt2"])}), "cpu")
    assert model.config._attn_implementation == "eager"
    assert not model.training


def test_model_info_round_trips_through_its_file(tiny_models, tmp_path):
    info = models.describe_model("llama", {"local_dir": str(tiny_models["llama"])})
    info.write(tmp_path / "info.json")
    assert ModelInfo.read(tmp_path / "info.json") == info
    (tmp_path / "bad.json").write_text('{"model": "x"}')
    with pytest.raises(ContractError, match="missing field"):
        ModelInfo.read(tmp_path / "bad.json")


def test_unknown_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError) as error:
        models.describe_model("x", {"hf_id": "nobody/no-such-model"})
    message = str(error.value)
    assert message == ("cannot load model 'nobody/no-such-model': not a local folder, and the Hugging Face Hub "
                       "is offline (HF_HUB_OFFLINE=1)")


def test_missing_local_folder(tmp_path):
    with pytest.raises(models.ModelLoadError, match="no config.json in that folder"):
        models.describe_model("x", {"local_dir": str(tmp_path / "missing")})


def test_missing_gguf_file(tmp_path):
    with pytest.raises(models.ModelLoadError, match="no such file"):
        models.convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


def test_cuda_requested_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(models.ModelLoadError, match="CUDA is not available"):
        models.resolve_device("cuda")
