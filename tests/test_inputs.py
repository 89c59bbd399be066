"""The files a config points at (model folders, GGUF files, corpus files): each bad one stops with one line
naming it, at start-up (attnprog.inputs) or, past the start-up sniff, where the corpus is read."""
import json
import re

import pytest

from attnprog import data
from attnprog.inputs import InputError, check_inputs, model_folder_files
from tinyworld import PASSAGES, run_snakemake, tiny_config


def model_folder(folder, config=True, weights=True):
    """A folder with what the start-up check looks at (never loaded here)."""
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def config_with(tmp_path, model=None, files=None):
    model = model or {"local_dir": str(model_folder(tmp_path / "good_model"))}
    return tiny_config({}) | {"models": {"m": model}, "corpus": {"source": {"files": files or [str(PASSAGES)]}}}


def bad_inputs(tmp_path):
    """{case: (config, the one-line message expected)}."""
    bad_config = model_folder(tmp_path / "bad_config")
    (bad_config / "config.json").write_text("{not json")
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"some text\0\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04not a gguf")
    return {
        "model folder missing": (config_with(tmp_path, {"local_dir": str(tmp_path / "nope")}),
                                 rf"models.m.local_dir: no such folder: {tmp_path / 'nope'}$"),
        "no config.json": (config_with(tmp_path, {"local_dir": str(model_folder(tmp_path / "nc", config=False))}),
                           r"models.m.local_dir: .*/nc has no config.json"),
        "bad config.json": (config_with(tmp_path, {"local_dir": str(bad_config)}),
                            r"models.m.local_dir: .*/bad_config/config.json is not a valid config.json"),
        "no weights": (config_with(tmp_path, {"local_dir": str(model_folder(tmp_path / "nw", weights=False))}),
                       r"models.m.local_dir: .*/nw has no weights"),
        "gguf missing": (config_with(tmp_path, {"gguf_file": str(tmp_path / "nope.gguf")}),
                         r"models.m.gguf_file: no such file: .*nope.gguf$"),
        "not a gguf": (config_with(tmp_path, {"gguf_file": str(tmp_path / "fake.gguf")}),
                       r"models.m.gguf_file: .*fake.gguf is not a GGUF file"),
        "corpus file missing": (config_with(tmp_path, files=[str(tmp_path / "nope.txt")]),
                                r"corpus.source.files: .*nope.txt: no such file$"),
        "corpus file suffix": (config_with(tmp_path, files=[str(tmp_path / "corpus.csv")]),
                               r"corpus.source.files: .*corpus.csv: expected a .txt or .jsonl file$"),
        "corpus file empty": (config_with(tmp_path, files=[str(tmp_path / "empty.txt")]),
                              r"corpus.source.files: .*empty.txt: the file is empty$"),
        "corpus file binary": (config_with(tmp_path, files=[str(tmp_path / "binary.txt")]),
                               r"corpus.source.files: .*binary.txt: a binary file, not text$"),
        "corpus file not UTF-8": (config_with(tmp_path, files=[str(tmp_path / "latin1.txt")]),
                                  r"corpus.source.files: .*latin1.txt: not UTF-8 text \(byte 3\)$"),
    }


CASES = ["model folder missing", "no config.json", "bad config.json", "no weights", "gguf missing", "not a gguf",
         "corpus file missing", "corpus file suffix", "corpus file empty", "corpus file binary", "corpus file not UTF-8"]


def test_good_inputs_pass(tmp_path):
    check_inputs(config_with(tmp_path))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_naming_it(case, tmp_path):
    config, message = bad_inputs(tmp_path)[case]
    with pytest.raises(InputError) as raised:
        check_inputs(config)
    assert "\n" not in str(raised.value) and re.match(message, str(raised.value)), str(raised.value)


def test_model_folder_files_are_its_top_level_files(tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / ".hidden").write_text("x")
    (folder / "sub").mkdir()
    assert model_folder_files(folder) == [str(folder / "config.json"), str(folder / "model.safetensors")]


def test_a_bad_byte_past_the_start_up_sniff_stops_with_the_line(tmp_path):
    """The start-up check reads the head of a file; the corpus rule streams the rest."""
    path = tmp_path / "late.txt"
    path.write_bytes(b"A first passage of plain words.\n\n" * 4000 + b"caf\xe9\n")
    check_inputs(config_with(tmp_path, files=[str(path)]))
    passages = data.passages({"files": [str(path)]})
    assert next(passages) == "A first passage of plain words.\n"  # streamed: the bad byte is not read yet
    with pytest.raises(data.CorpusError, match=rf"^corpus: {path}:8001: not UTF-8 text$"):
        list(passages)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"corpus: .*bad.jsonl:2: not a JSON object"),
    ('{"title": "x"}', r'corpus: .*bad.jsonl:2 has no "text" field'),
    ('{"text": 5}', r'corpus: .*bad.jsonl:2 has no "text" field'),
    ('["text"]', r'corpus: .*bad.jsonl:2 has no "text" field'),
])
def test_a_bad_jsonl_line_is_one_line_naming_it(line, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(data.CorpusError, match=message) as raised:
        list(data.passages({"files": [str(path)]}))
    assert "\n" not in str(raised.value)


@pytest.mark.workflow
@pytest.mark.parametrize("case", ["no weights", "corpus file binary"])
def test_snakemake_stops_on_a_bad_input_with_one_line(case, tmp_path):
    config, message = bad_inputs(tmp_path)[case]
    result = run_snakemake(tmp_path / "work", config, "-n", check=False)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(message, errors[0].removeprefix("error: ")), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
