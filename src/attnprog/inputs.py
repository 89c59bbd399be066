"""The files a user points the config at (model folders, GGUF files, corpus files): checked when the workflow
starts, before any job runs, so a bad one stops the run with one line naming it; and listed, so the rules
declare them as inputs and editing one reruns what depends on it.

The QA tasks' files (task YAMLs, their includes and data, include_path) are checked in attnprog.qa.tasks.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path

from .config import ConfigError

# What a Hugging Face model folder holds weights in (sharded or not).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "tf_model.h5", "flax_model.msgpack")
CORPUS_SUFFIXES = (".txt", ".jsonl")
# The head of a corpus file read at start-up to tell text from binary; the corpus rule reads the rest,
# streaming, and stops with one line at the first byte that is not UTF-8.
SNIFF_BYTES = 1 << 16


class InputError(ConfigError):
    """A user's input file or folder that cannot be used, worded in one line naming it."""


# What the shell reads as something other than part of a word, where a path is written unquoted.
SHELL_SPECIAL = frozenset(" \t\n'\"\\$`;&|<>()*?[]")


def check_script_python(python: str) -> None:
    """Snakemake runs each `script:` job as `<its own Python> <script>` with that Python's path unquoted
    (snakemake/snakemake#2645, still so in 9.x): from a Python under a path with a space, every such job
    fails with a bare "No such file or directory". Say why before any job runs."""
    special = sorted(set(python) & SHELL_SPECIAL)
    if special:
        raise InputError(f"Snakemake runs from {python!r}, whose path holds {''.join(special)!r}: it runs the "
                         "workflow's scripts with that path unquoted (snakemake#2645), so every job would fail. "
                         "Use a Python environment at a path without spaces or shell characters (with the "
                         "Makefile: make run VENV=/path/without/spaces)")


def model_folder_files(folder: str | Path) -> list[str]:
    """The files of a local Hugging Face model folder that loading it reads (every file at its top level:
    config, weights, tokenizer); the model_info rule declares them, so editing one reruns the model."""
    return sorted(str(p) for p in Path(folder).expanduser().resolve().iterdir()
                  if p.is_file() and not p.name.startswith("."))


def check_model_folder(name: str, folder: str) -> None:
    where = f"models.{name}.local_dir"
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"{where}: no such folder: {folder}")
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"{where}: {folder} has no config.json (not a Hugging Face model folder)")
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{where}: {config} is not a valid config.json ({str(error).splitlines()[0]})") from None
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise InputError(f"{where}: {folder} has no weights ({', '.join(WEIGHT_PATTERNS)})")


def check_gguf_file(name: str, file: str) -> None:
    where = f"models.{name}.gguf_file"
    path = Path(file).expanduser()
    if not path.is_file():
        raise InputError(f"{where}: no such file: {file}")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InputError(f"{where}: {file} is not a GGUF file (it does not start with 'GGUF')")


def check_corpus_file(path: str) -> None:
    """A corpus file must exist, be a .txt or .jsonl file, hold something, and start as UTF-8 text."""
    file = Path(path).expanduser()
    where = f"corpus.source.files: {path}"
    if not file.is_file():
        raise InputError(f"{where}: no such file")
    if file.suffix not in CORPUS_SUFFIXES:
        raise InputError(f"{where}: expected a {' or '.join(CORPUS_SUFFIXES)} file")
    with file.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if not head.strip():
        raise InputError(f"{where}: the file is empty")
    if b"\0" in head:
        raise InputError(f"{where}: a binary file, not text")
    try:  # incremental, final=False: a character cut by the sniff's end is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as error:
        raise InputError(f"{where}: not UTF-8 text (byte {error.start})") from None


def check_inputs(config: dict) -> None:
    """Check every file and folder a validated config points at; raise InputError on the first bad one."""
    for name, spec in config["models"].items():
        if "local_dir" in spec:
            check_model_folder(name, spec["local_dir"])
        elif "gguf_file" in spec:
            check_gguf_file(name, spec["gguf_file"])
    for path in config["corpus"]["source"].get("files", []):
        check_corpus_file(path)
