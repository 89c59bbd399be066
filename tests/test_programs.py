"""The program format: loading both signatures, normalisation, running (trusted and sandboxed), failures,
the causality check and the prefix-by-prefix run, and the cached per-call runner."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from attnprog.matrices import normalise as normalise_attention
from attnprog.programs import Program, ProgramError, load_programs, programs_from_source
from attnprog.runner import ProgramRunner, check_causal, run_prefixwise, run_programs
from attnprog.sandbox import UNGUARDED, Limits, Sandbox

FIXTURES = Path(__file__).parent / "fixtures" / "programs"
EXAMPLES = [[" The", " cat", " sat", " on", " the", " mat", "."],
            [" A", " dog", " ran", ",", " then", " it", " slept", " in", " the", " sun", "."],
            [" Hi", "."]]
FAST = Limits(seconds_per_call=1.0, memory_mb=256)


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=1) as sandbox:
        yield sandbox


def program(source: str, name: str = "prog", trusted: bool = False) -> Program:
    return programs_from_source(source, name, trusted=trusted)[0]


def trusted(p: Program) -> Program:
    return dataclasses.replace(p, trusted=True)


def previous_token_rows(n: int) -> np.ndarray:
    expected = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        expected[i, max(i - 1, 0)] = 1
    return expected


# ---- loading -----------------------------------------------------------------------------------------------


def test_load_attention_program():
    (p,) = load_programs(FIXTURES / "previous_token.py")
    assert (p.name, p.kind, p.function, p.trusted) == ("previous_token", "tokens", "attention", False)
    assert p.description == "Each token attends to the token just before it (the first token to itself)."
    assert "copies the previous position" in p.docstring
    assert p.path.endswith("previous_token.py") and "def attention" in p.source
    assert load_programs(FIXTURES / "previous_token.py", trusted=True)[0].trusted


def test_load_reference_signature_file_gives_one_program_per_function():
    programs = load_programs(FIXTURES / "reference_style.py")
    assert [p.name for p in programs] == ["reference_style.first_token", "reference_style.self_attention"]
    assert all(p.kind == "reference" for p in programs)
    assert programs[0].description == "Every token attends to the first token."
    assert programs[1].description.startswith("Programs written to the reference")  # falls back to the module's


def test_loading_never_runs_the_code(tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').close()\ndef attention(tokens):\n    return None\n"
    (tmp_path / "sneaky.py").write_text(source)
    assert load_programs(tmp_path / "sneaky.py")[0].name == "sneaky"
    assert not marker.exists()


def test_load_folder_and_clear_errors(tmp_path):
    with pytest.raises(ProgramError, match="no `attention\\(tokens\\)` function") as failure:
        load_programs(FIXTURES / "not_a_program.py")
    assert failure.value.status == "rejected" and "not_a_program.py" in str(failure.value)
    (tmp_path / "broken.py").write_text("def attention(tokens)\n    return 1\n")
    with pytest.raises(ProgramError, match="broken.py:1") as failure:
        load_programs(tmp_path / "broken.py")
    assert failure.value.status == "syntax_error"
    with pytest.raises(FileNotFoundError):
        load_programs(tmp_path / "missing.py")
    for name in ("previous_token.py", "next_token.py"):
        (tmp_path / "folder").mkdir(exist_ok=True)
        (tmp_path / "folder" / name).write_text((FIXTURES / name).read_text())
    assert [p.name for p in load_programs(tmp_path / "folder")] == ["next_token", "previous_token"]


# ---- normalisation -----------------------------------------------------------------------------------------


def test_normalise_masks_the_future_and_makes_rows_distributions():
    raw = np.arange(16, dtype=float).reshape(4, 4) + 1
    out = normalise_attention(raw, 4)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    assert np.allclose(np.triu(out, 1), 0) and np.allclose(out.sum(axis=1), 1)
    assert np.allclose(out[1, :2], [5 / 11, 6 / 11])
    assert np.allclose(normalise_attention(out, 4), out)  # idempotent
    full = normalise_attention(raw, 4, causal=False)
    assert np.allclose(full[0], raw[0] / raw[0].sum())


def test_normalise_cleans_bad_values_and_empty_rows():
    raw = np.array([[np.nan, 0, 0], [-1.0, 0.0, 0], [np.inf, 2.0, 2.0]])
    out = normalise_attention(raw, 3)
    assert np.array_equal(out[0], [1, 0, 0])        # NaN -> 0, empty row -> position 0
    assert np.array_equal(out[1], [1, 0, 0])        # negatives -> 0
    assert np.allclose(out[2], [0, 0.5, 0.5])       # inf -> 0
    huge = normalise_attention(np.full((3, 3), 1e308), 3)  # no overflow in the row sums
    assert np.allclose(huge[2], 1 / 3) and np.isfinite(huge).all()
    with pytest.raises(ValueError, match="shape"):
        normalise_attention(np.ones((3, 2)), 3)


# ---- running -------------------------------------------------------------------------------------------------


def test_sandboxed_and_trusted_runs_agree(box):
    (p,) = load_programs(FIXTURES / "previous_token.py")
    sandboxed = run_programs([p], EXAMPLES, sandbox=box)["previous_token"]
    in_process = run_programs([trusted(p)], EXAMPLES)["previous_token"]
    assert sandboxed.status == in_process.status == "ok"
    for a, b, tokens in zip(sandboxed.matrices, in_process.matrices, EXAMPLES):
        assert np.array_equal(a, b) and np.array_equal(a, previous_token_rows(len(tokens)))
    # paths work too (loaded as untrusted)
    by_path = run_programs([FIXTURES / "previous_token.py"], EXAMPLES, sandbox=box)["previous_token"]
    assert all(np.array_equal(a, b) for a, b in zip(by_path.matrices, sandboxed.matrices))


def test_trusted_programs_run_in_process_without_the_sandbox_rules(box):
    source = "import os\nimport numpy as np\ndef attention(tokens):\n    return np.eye(len(tokens)) * os.getpid()\n"
    assert run_programs([program(source)], EXAMPLES[:1], sandbox=box)["prog"].status == "rejected"
    run = run_programs([program(source, trusted=True)], EXAMPLES[:1])["prog"]
    assert run.status == "ok" and np.array_equal(run.matrices[0], np.eye(7))


def test_failing_programs_score_worst_without_crashing(box):
    good = program((FIXTURES / "previous_token.py").read_text(), "good")
    bad = {
        "raises": "def attention(tokens):\n    raise KeyError('boom')\n",
        "shape": "import numpy as np\ndef attention(tokens):\n    return np.ones((2, 3))\n",
        "loops": "def attention(tokens):\n    while True:\n        pass\n",
        "imports_os": "import os\ndef attention(tokens):\n    return None\n",
    }
    programs = [good] + [program(source, name) for name, source in bad.items()]
    broken = Program("syntax", None, "def attention(tokens)\n", "", "", "tokens", "attention")
    runs = run_programs(programs + [broken], EXAMPLES, sandbox=box, limits=Limits(0.5, 256))
    assert runs["good"].status == "ok" and runs["good"].n_failed == 0
    assert {name: runs[name].status for name in bad} == {"raises": "runtime_error", "shape": "bad_output",
                                                          "loops": "timeout", "imports_os": "rejected"}
    assert runs["syntax"].status == "syntax_error"
    assert "KeyError: 'boom'" in runs["raises"].error and "'os'" in runs["imports_os"].error
    for name in list(bad) + ["syntax"]:
        assert runs[name].matrices == [None] * len(EXAMPLES)  # nothing to score: the worst score
    # the same failures in-process, for trusted programs
    in_process = run_programs([trusted(program(bad["raises"], "raises")),
                               trusted(program(bad["shape"], "shape"))], EXAMPLES)
    assert in_process["raises"].status == "runtime_error" and in_process["shape"].status == "bad_output"


def test_a_failure_on_one_example_only_spoils_that_example(box):
    source = "import numpy as np\ndef attention(tokens):\n    assert len(tokens) > 2\n    return np.eye(len(tokens))\n"
    for p in (program(source), program(source, trusted=True)):
        run = run_programs([p], EXAMPLES, sandbox=box)["prog"]
        assert run.status == "runtime_error" and run.n_failed == 1
        assert run.matrices[2] is None and np.array_equal(run.matrices[0], np.eye(7))


# ---- causality ------------------------------------------------------------------------------------------------


def test_check_causal_passes_causal_programs_and_catches_look_ahead(box):
    (previous,) = load_programs(FIXTURES / "previous_token.py")
    (look_ahead,) = load_programs(FIXTURES / "next_token.py")
    ends_with_period = program(
        "import numpy as np\ndef attention(tokens):\n"
        "    n = len(tokens)\n"
        "    return np.eye(n) if tokens[-1].strip() == '.' else np.ones((n, n))\n", "peeks_at_the_end")
    assert check_causal(previous, EXAMPLES, sandbox=box)
    assert check_causal(trusted(previous), EXAMPLES)
    result = check_causal(look_ahead, EXAMPLES, sandbox=box)
    assert not result and result.max_difference > 0.1 and "later tokens" in result.detail
    assert not check_causal(ends_with_period, EXAMPLES, sandbox=box)
    broken = check_causal(program("def attention(tokens):\n    return 1 / 0\n"), EXAMPLES, sandbox=box)
    assert not broken and "could not be checked" in broken.detail


def test_prefixwise_run_makes_a_look_ahead_program_causal(box):
    (look_ahead,) = load_programs(FIXTURES / "next_token.py")
    run = run_prefixwise(look_ahead, EXAMPLES, sandbox=box)
    assert run.status == "ok"
    for tokens, matrix in zip(EXAMPLES, run.matrices):
        for i in range(len(tokens)):  # row i is the last row of the program's output on tokens[:i+1]
            alone = run_programs([look_ahead], [tokens[:i + 1]], sandbox=box)["next_token"].matrices[0]
            assert np.allclose(matrix[i, :i + 1], alone[-1]) and not matrix[i, i + 1:].any()
    changed = [t[:3] + [" zebra"] * (len(t) - 3) for t in EXAMPLES]
    again = run_prefixwise(look_ahead, changed, sandbox=box)
    for a, b in zip(run.matrices, again.matrices):
        assert np.array_equal(a[:3], b[:3])  # rows before the change do not move
    # for a causal program, the prefix-by-prefix run is the plain run
    (previous,) = load_programs(FIXTURES / "previous_token.py")
    plain = run_programs([trusted(previous)], EXAMPLES)["previous_token"]
    prefixwise = run_prefixwise(trusted(previous), EXAMPLES)
    assert all(np.array_equal(a, b) for a, b in zip(plain.matrices, prefixwise.matrices))


# ---- the per-call runner -------------------------------------------------------------------------------------


class CountingSandbox:
    """A sandbox that counts the jobs it is given."""

    def __init__(self, sandbox):
        self.sandbox, self.jobs = sandbox, 0

    def run_many(self, jobs, limits):
        self.jobs += len(jobs)
        return self.sandbox.run_many(jobs, limits)


def test_program_runner_caches_by_tokens_and_raises_on_failure(box):
    (p,) = load_programs(FIXTURES / "previous_token.py")
    counting = CountingSandbox(box)
    runner = ProgramRunner(p, sandbox=counting)
    first = runner(EXAMPLES[0])
    assert np.array_equal(first, previous_token_rows(7)) and counting.jobs == 1
    both = runner.many([EXAMPLES[0], EXAMPLES[1]])  # one new job for the one new example
    assert counting.jobs == 2 and np.array_equal(both[0], first)
    runner(EXAMPLES[1])
    assert counting.jobs == 2
    failing = ProgramRunner(program("import numpy as np\ndef attention(tokens):\n"
                                    "    return np.eye(len(tokens)) * len(tokens[9])\n"), sandbox=counting)
    with pytest.raises(ProgramError, match="IndexError") as failure:
        failing.many(EXAMPLES)  # fails on the 7- and 2-token examples, works on the 11-token one
    assert failure.value.status == "runtime_error" and counting.jobs == 3
    with pytest.raises(ProgramError):
        failing(EXAMPLES[0])
    assert counting.jobs == 4
    assert failing(EXAMPLES[1]).shape == (11, 11) and counting.jobs == 4  # cached from the failed batch
    causal_view = ProgramRunner(trusted(load_programs(FIXTURES / "next_token.py")[0]), prefixwise=True)
    assert np.allclose(causal_view(EXAMPLES[2]), [[1, 0], [0.1 / 1.1, 1 / 1.1]])  # row 0 cannot see token 1


# ---- reference-signature programs with a real tokenizer ----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tinyworld import make_tokenizer
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(bos=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_box(tokenizer_dir):
    with Sandbox(tokenizer_dir, workers=1) as sandbox:
        yield sandbox


def reference_examples(tokenizer_dir):
    from transformers import AutoTokenizer

    from attnprog.data import token_strings
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["The cat sat on the mat.", "A dog ran in the sun."]
    return [(token_strings(tokenizer, tokenizer(text).input_ids), text) for text in texts]


def test_reference_programs_run_with_the_models_tokenizer(tokenizer_dir, tokenizer_box):
    examples = reference_examples(tokenizer_dir)
    programs = load_programs(FIXTURES / "reference_style.py")
    runs = run_programs(programs, examples, tokenizer_dir=tokenizer_dir, sandbox=tokenizer_box)
    assert check_causal(programs[0], examples, tokenizer_dir=tokenizer_dir, sandbox=tokenizer_box)
    # the text must give as many tokens as the example has; otherwise the output is bad_output
    wrong = run_programs(programs[:1], [(examples[0][0], examples[0][1] + " And more words.")],
                         tokenizer_dir=tokenizer_dir, sandbox=tokenizer_box)
    for (tokens, _), matrix in zip(examples, runs["reference_style.first_token"].matrices):
        n = len(tokens)
        assert matrix.shape == (n, n) and np.array_equal(matrix[:, 0], np.ones(n))
    assert runs["reference_style.self_attention"].status == "ok"
    assert wrong["reference_style.first_token"].status == "bad_output"
    in_process = run_programs([trusted(programs[1])], examples, tokenizer_dir=tokenizer_dir)
    assert np.array_equal(in_process["reference_style.self_attention"].matrices[1],
                          runs["reference_style.self_attention"].matrices[1])
    with pytest.raises(ValueError, match="tokenizer_dir"):
        run_programs(programs, examples)


def test_programs_in_the_style_of_llm_output_run_the_same_in_the_sandbox(box):
    (p,) = load_programs(FIXTURES / "llm_idioms.py")
    sandboxed = run_programs([p], EXAMPLES, sandbox=box)["llm_idioms"]
    in_process = run_programs([trusted(p)], EXAMPLES)["llm_idioms"]
    assert sandboxed.status == "ok", sandboxed.error
    assert all(np.array_equal(a, b) for a, b in zip(sandboxed.matrices, in_process.matrices))


def test_reference_programs_cannot_use_the_tokenizer_to_touch_files(tokenizer_dir, tokenizer_box, tmp_path):
    examples = reference_examples(tokenizer_dir)[:1]
    target = tmp_path / "written"
    attacks = {
        "save_pretrained": f"tokenizer.save_pretrained({str(target)!r})",   # Python file writes
        "rust_save": f"tokenizer._tokenizer.backend_tokenizer.save({str(target)!r})",  # the Rust core
        "backend": "tokenizer.backend_tokenizer.to_str()",                  # not part of the narrow interface
    }
    programs = [programs_from_source(
        f"import numpy as np\ndef f(sentence, tokenizer):\n    {code}\n    return 'x', np.eye(3)\n", name)[0]
        for name, code in attacks.items()]
    runs = run_programs(programs, examples, tokenizer_dir=tokenizer_dir, sandbox=tokenizer_box)
    assert runs["save_pretrained.f"].status == runs["rust_save.f"].status == "rejected"
    assert runs["backend.f"].status == "runtime_error" and "no attribute 'backend_tokenizer'" in runs["backend.f"].error
    # With the Python-level guards off, the Rust core can be reached, and the jail keeps it off host files.
    with Sandbox(tokenizer_dir, workers=1, policy=UNGUARDED) as weak:
        runs = run_programs(programs[1:2], examples, tokenizer_dir=tokenizer_dir, sandbox=weak)
    assert runs["rust_save.f"].status == "runtime_error"
    assert not target.exists()


def test_reference_library_programs_are_told_from_helpers():
    source = '''
import numpy as np

def tokenize_words(sentence, tokenizer):
    return tokenizer(sentence).input_ids, [0]

def spans(text, tok):
    return [(0, 1)]

def prog_a(sentence, tokenizer):
    ids, _ = tokenize_words(sentence, tokenizer)
    return np.eye(len(ids))

def prog_b(sentence, tokenizer):
    label, m = "b", prog_c(sentence, tokenizer)[1]
    return "B", m

def prog_c(sentence, tokenizer):
    return f"C{len(spans(sentence, tokenizer))}", np.eye(2)

PROGRAMS = [prog_a, prog_b, prog_c]
'''
    names = [p.function for p in programs_from_source(source, "lib")]
    # helpers: called by another function and not returning a labelled pair; programs: the rest
    assert names == ["prog_a", "prog_b", "prog_c"]


def test_a_generated_reference_library_loads_and_runs(tokenizer_dir, tokenizer_box, tmp_path):
    from fixtures.reference_library import make_library

    from attnprog.scoring import mean_iou
    path = tmp_path / "library.py"
    path.write_text(make_library(60))
    programs = load_programs(path)
    assert len(programs) == 60 and all(p.function.startswith("prog_") for p in programs)
    examples = reference_examples(tokenizer_dir)
    runs = run_programs(programs, examples, tokenizer_dir=tokenizer_dir, sandbox=tokenizer_box,
                        limits=Limits(seconds_per_call=5, memory_mb=1024))
    failed = {name: run for name, run in runs.items() if run.status != "ok"}
    assert len(failed) <= 3, {name: run.error for name, run in failed.items()}
    assert failed and all(run.status == "runtime_error" and "NameError: name 'get_word_ids'" in run.error
                          for run in failed.values())
    uniform = [np.tril(np.ones((len(t), len(t)))) / np.arange(1, len(t) + 1)[:, None] for t, _ in examples]
    spacy_programs = [p.name for p in programs if "word_of_token" in p.source.split(f"def {p.function}(")[1][:200]]
    assert len(spacy_programs) >= 10
    for name in spacy_programs:  # the spaCy programs run and score
        assert runs[name].status == "ok" and 0 < mean_iou(runs[name].matrices, uniform) <= 1
    noisy = [p for p in programs if "np.random.rand" in p.source.split(f"def {p.function}(")[1][:300]]
    again = run_programs(noisy[:1], examples, tokenizer_dir=tokenizer_dir, sandbox=tokenizer_box)
    assert all(np.array_equal(a, b) for a, b in zip(again[noisy[0].name].matrices, runs[noisy[0].name].matrices))


def test_an_ok_status_without_a_matrix_is_not_ok():
    """Whatever a sandbox reports, a run is "ok" only with every matrix present (consumers rely on it)."""
    from attnprog.sandbox import JobResult

    class LyingSandbox:
        def run_many(self, jobs, limits):
            return [JobResult("ok", None, [None] * len(job.calls), ["ok"] * len(job.calls), [None] * len(job.calls))
                    for job in jobs]

    (p,) = load_programs(FIXTURES / "previous_token.py")
    run = run_programs([p], EXAMPLES, sandbox=LyingSandbox())["previous_token"]
    assert run.status == "bad_output" and run.matrices == [None] * len(EXAMPLES)


def test_a_file_over_the_size_limit_fails_in_one_line_without_being_read_whole(tmp_path):
    import tracemalloc
    from attnprog.programs import MAX_FILE_CHARS
    path = tmp_path / "huge.py"
    path.write_text("x = 1\n" * (20_000_000 // 6))  # 20 M characters
    tracemalloc.start()
    try:
        with pytest.raises(ProgramError) as caught:
            load_programs(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(caught.value) == f"{path}: file is longer than {MAX_FILE_CHARS} characters"
    assert caught.value.status == "rejected"
    assert peak < 4 * MAX_FILE_CHARS + (1 << 20)  # at most the first MAX_FILE_CHARS + 1 characters were held


def test_a_file_that_is_not_utf8_fails_in_one_line(tmp_path):
    path = tmp_path / "latin.py"
    path.write_bytes(b"def attention(tokens):\n    return '\xe9'\n")
    with pytest.raises(ProgramError, match=r"latin\.py: not UTF-8 text") as caught:
        load_programs(path)
    assert "\n" not in str(caught.value)
