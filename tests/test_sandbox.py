"""The Python-level guards of the sandbox (the lint, restricted builtins, module views) and the limits,
with every guard on, as the workflow runs untrusted code. Each attack's *effect* is checked (the file was
not written, the secret did not come back, the worker survived), not only that the run failed. Attacks
that get past the guards must be contained by the jail: tests/test_jail.py turns the guards off and
checks the jail alone, from outside.
"""
import os
import textwrap
import time
import types
import warnings

import numpy as np
import pytest

from attnprog.programs import programs_from_source
from attnprog.runner import run_programs
from attnprog.sandbox import (ALLOWED_IMPORTS, DENIED_ATTRIBUTES, MAX_PROGRAM_CHARS, Job, Limits, ProgramError, Sandbox,
                              check_program, module_table, validate_source)

EXAMPLE = [" The", " cat", " sat", "."]
FAST = Limits(seconds_per_call=0.5, memory_mb=256)
ROOMY = Limits(seconds_per_call=5, memory_mb=128)  # for attacks that are slow to fill memory on a small VM


@pytest.fixture(scope="module")
def strict():
    with Sandbox(workers=1) as box:
        yield box


def attack(box, body: str, examples=(EXAMPLE,), limits=FAST):
    """Run `body` (module-level code that defines attention(tokens)) in `box`; return the ProgramRun."""
    source = "import numpy as np\n" + textwrap.dedent(body)
    program = programs_from_source(source, "attack")[0]
    return run_programs([program], list(examples), sandbox=box, limits=limits)["attack"]


def in_attention(code: str) -> str:
    """A program whose attention() runs `code` first, then returns the identity."""
    return "def attention(tokens):\n" + textwrap.indent(textwrap.dedent(code), "    ") + \
        "\n    return np.eye(len(tokens))\n"


def still_serves(box) -> bool:
    """The worker answers the next program correctly (it was not killed, blocked or confused)."""
    run = attack(box, in_attention("pass"))
    return run.status == "ok" and np.array_equal(run.matrices[0], np.eye(len(EXAMPLE), dtype=np.float32))


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("31415 92653\n")
    return path


# ---- the lint ------------------------------------------------------------------------------------------


def test_writing_and_reading_files_is_rejected(strict, tmp_path, secret_file):
    target = tmp_path / "pwned.txt"
    run = attack(strict, in_attention(f"open({str(target)!r}, 'w').write('pwned')"))
    assert run.status == "rejected" and "open" in run.error
    run = attack(strict, in_attention(f"data = open({str(secret_file)!r}).read()"))
    assert run.status == "rejected"
    for code in (f"np.save({str(target)!r}, np.zeros(3))", f"secret = np.loadtxt({str(secret_file)!r})",
                 f"np.zeros(3).tofile({str(target)!r})"):
        assert attack(strict, in_attention(code)).status == "rejected"
    assert not target.exists()


@pytest.mark.parametrize("statement", ["import os", "import subprocess", "import socket", "import ctypes",
                                       "import importlib", "from os import system", "import numpy.testing",
                                       "from numpy import ctypeslib", "import attnprog.sandbox"])
def test_importing_dangerous_modules_is_rejected(strict, statement, tmp_path):
    marker = tmp_path / "marker"
    run = attack(strict, statement + "\n" + in_attention(f"open({str(marker)!r}, 'w')"))
    assert run.status == "rejected" and "not allowed" in run.error
    assert not marker.exists()


def test_import_and_name_tricks_are_rejected(strict):
    for code in ("os = __import__('os')", "getattr(np, 'ma')", "vars(np)", "globals()['np']",
                 "eval('1 + 1')", "exec('x = 1')", "compile('1', 'x', 'eval')", "__builtins__",
                 "np.__dict__", "tokens.__class__", "np._core", "breakpoint()", "input()",
                 "import numpy as __builtins__", "from attnprog import programs",
                 "from numpy.lib.stride_tricks import as_strided", "np.zeros(3).ctypes.data"):
        run = attack(strict, in_attention(code))
        assert run.status == "rejected", code
        assert run.matrices == [None]


def test_attribute_walks_through_allowed_modules_are_stopped(strict, tmp_path):
    marker = tmp_path / "marker"
    # numpy.ma.core imports builtins; typing imports sys; str.format walks through string.Formatter
    for code in (f"np.ma.core.builtins.open({str(marker)!r}, 'w')",
                 "import typing\ntyping.sys.modules['os'].system('true')",
                 "import string\nstring.Formatter().vformat('{0.__class__}', [1], {})"):
        assert attack(strict, in_attention(code)).status == "rejected", code
    # Names the lint allows that the module views do not have
    run = attack(strict, in_attention("x = np.ma"))
    assert run.status == "runtime_error" and "has no attribute 'ma'" in run.error
    run = attack(strict, in_attention("import attnprog.helpers\nattnprog.programs.load_programs('/')"))
    assert run.status == "runtime_error" and "has no attribute 'programs'" in run.error
    assert not marker.exists()


def test_format_string_walks_are_rejected(strict):
    for code in ("'{0.__class__.__mro__}'.format(tokens)", "fmt = '{0.x}'\nfmt.format(tokens)",
                 "'{0[0]}'.format(tokens)", "'{:{0.x}}'.format(tokens)", "'{x}'.format_map({'x': 1})"):
        assert attack(strict, in_attention(code)).status == "rejected", code
    # Plain formatting of a literal is fine.
    assert attack(strict, in_attention("label = '{} {:.2f}'.format(len(tokens), 0.5)")).status == "ok"


def test_match_pattern_attribute_walk_is_rejected(strict):
    code = "match tokens:\n    case object(__class__=cls):\n        pass"
    run = attack(strict, in_attention(code))
    assert run.status == "rejected" and "__class__" in run.error


def test_code_hidden_in_a_string_annotation_is_stopped(strict, tmp_path):
    # The lint does not read strings; typing.get_type_hints evals this one, and the restricted import stops it.
    marker = tmp_path / "marker"
    run = attack(strict, f"""
        import typing
        def helper(x: "__import__('os').system('touch {marker}')"):
            return x
        def attention(tokens):
            typing.get_type_hints(helper)
            return np.eye(len(tokens))
        """)
    assert run.status == "runtime_error" and "import of 'os' is not allowed" in run.error
    assert not marker.exists()


# ---- time, memory, output ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    in_attention("while True:\n    pass"),
    "while True:\n    pass\n" + in_attention("pass"),                      # in the module itself
    in_attention("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')"),         # catastrophic backtracking
], ids=["loop", "module_loop", "regex"])
def test_endless_programs_time_out(strict, body):
    began = time.monotonic()
    run = attack(strict, body)
    assert run.status == "timeout" and run.matrices == [None]
    assert time.monotonic() - began < 5 * FAST.seconds_per_call + 1
    assert still_serves(strict)


@pytest.mark.parametrize("code", ["s = 'x'\nwhile True:\n    s += s", "a = np.ones((100000, 100000))",
                                  "keep = [bytearray(2 ** 24) for _ in range(1000)]"])
def test_memory_bombs_are_stopped(strict, code):
    run = attack(strict, in_attention(code), limits=ROOMY)
    assert run.status == "memory" and run.matrices == [None]
    assert still_serves(strict)


def test_recursion_bomb_fails_cleanly(strict):
    run = attack(strict, "def attention(tokens):\n    return attention(tokens)\n")
    assert run.status == "runtime_error" and "RecursionError" in run.error
    assert still_serves(strict)


@pytest.mark.parametrize("result, problem", [
    ("np.zeros((4000, 4000))", "shape"),                   # a huge output is refused, not shipped
    ("np.ones((len(tokens) - 1, len(tokens)))", "shape"),
    ("np.ones(len(tokens))", "shape"),
    ("np.full((len(tokens), len(tokens)), np.nan)", "no finite values"),
    ("[['a'] * len(tokens)] * len(tokens)", "dtype"),
    ("None", "dtype"),
    ("[[1, 2], [3]]", "unusable"),
    ("np.ones((len(tokens), len(tokens))) * 1j", "dtype"),
])
def test_malformed_outputs_are_bad_output(strict, result, problem):
    run = attack(strict, f"def attention(tokens):\n    return {result}\n", limits=ROOMY)
    assert run.status == "bad_output" and problem in run.error
    assert run.matrices == [None]


def test_parser_bombs_and_huge_sources_fail_cleanly(strict):
    for source in ("x = " + "(" * 5000 + ")" * 5000, "x = " + "-" * 200_000 + "1", "x = [" + "[" * 300 + "]" * 301):
        with pytest.raises(ProgramError) as failure:
            validate_source(source)
        assert failure.value.status in ("syntax_error", "rejected")
    huge = "import numpy as np\ndef attention(tokens):\n" + "    x = 1\n" * (MAX_PROGRAM_CHARS // 9) + \
        "    return np.eye(len(tokens))\n"
    program = programs_from_source(huge, "huge")[0]
    run = run_programs([program], [EXAMPLE], sandbox=strict, limits=FAST)["huge"]
    assert run.status == "rejected" and "longer than" in run.error


def test_limits_and_lint_apply_per_program_not_per_file(strict):
    """A library file far over the per-program limit runs: each program is its function, the helpers it
    calls and the module-level code; a bad function, or one calling a missing helper, fails alone."""
    functions = "".join(f"def prog_{i}(sentence, tokenizer):\n    return 'p{i}', np.eye(3) * {i + 1}\n\n"
                        for i in range(3000))
    source = ("import numpy as np\n\ndef shared(n):\n    return np.eye(n)\n\n" + functions +
              "def uses_shared(sentence, tokenizer):\n    return 'shared', shared(3)\n\n"
              "def evil(sentence, tokenizer):\n    return 'evil', eval('np.eye(3)')\n\n"
              "def missing(sentence, tokenizer):\n    return 'missing', not_defined_anywhere(3)\n")
    assert len(source) > 2 * MAX_PROGRAM_CHARS
    checked = check_program(source, "lib.py", "uses_shared")
    assert len(checked.statements) == 3  # the import, `shared`, the function itself
    with pytest.raises(ProgramError, match="lib.py:.*eval"):
        check_program(source, "lib.py", "evil")
    assert len(programs_from_source(source, "lib")) == 3003
    names = ("prog_7", "uses_shared", "evil", "missing")
    # these programs ignore the tokenizer: run them as jobs, without one
    jobs = [Job(source, "lib.py", name, "reference", [([" a", " b", " c"], " a b c")]) for name in names]
    runs = dict(zip(names, strict.run_many(jobs, FAST)))
    assert runs["prog_7"].status == runs["uses_shared"].status == "ok"
    assert runs["evil"].status == "rejected" and "eval" in runs["evil"].error
    assert runs["missing"].status == "runtime_error"
    assert "NameError: name 'not_defined_anywhere' is not defined" in runs["missing"].error


# ---- the module views ------------------------------------------------------------------------------------


def test_no_real_module_is_reachable_from_what_programs_may_import():
    """Walk every attribute name the validator allows, from every importable module and the classes in
    them: the only modules on the way are the sandbox's own views."""
    table = module_table(ALLOWED_IMPORTS)
    views = {id(m) for m in table.values()}
    seen, todo, leaks = set(), list(table.items()), []
    while todo:
        path, obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name in dir(obj):
            if name.startswith("_") or name in DENIED_ATTRIBUTES:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    value = getattr(obj, name)
            except Exception:
                continue
            if isinstance(value, types.ModuleType):
                if id(value) not in views:
                    leaks.append(f"{path}.{name}")
                else:
                    todo.append((f"{path}.{name}", value))
            elif isinstance(value, type) and isinstance(obj, types.ModuleType):
                todo.append((f"{path}.{name}", value))
    assert not leaks, leaks[:10]
    assert "numpy" in table and "ma" not in dir(table["numpy"]) and hasattr(table["numpy"], "linalg")


def test_scores_and_errors_name_the_program_line(strict):
    run = attack(strict, "def attention(tokens):\n    return tokens[100]\n")
    assert run.status == "runtime_error"
    assert "attack:3: return tokens[100]: IndexError" in run.error




def test_the_environment_does_not_reach_programs(monkeypatch):
    from attnprog.sandbox import UNGUARDED
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-secret")
    with Sandbox(workers=1, policy=UNGUARDED) as box:
        run = attack(box, """
            import os
            KEY = repr(dict(os.environ))
            def attention(tokens):
                raise ValueError(KEY)
            """)
    assert run.status == "runtime_error" and "sk-test-secret" not in run.error and "ANTHROPIC" not in run.error


def test_one_program_cannot_touch_the_next(strict):
    spoiler = programs_from_source("import numpy as np\nnp.eye = None\nnp.zeros = None\n" +
                                   in_attention("pass").replace("np.eye(len(tokens))", "1"), "spoiler")
    victim = programs_from_source("import numpy as np\n" + in_attention("pass"), "victim")
    runs = run_programs(spoiler + victim, [EXAMPLE], sandbox=strict, limits=FAST)
    assert runs["spoiler"].status == "bad_output"
    assert runs["victim"].status == "ok" and np.array_equal(runs["victim"].matrices[0], np.eye(4))


# ---- Python-level bypass attempts: each is stopped by the lint or contained --------------------------------
# {secret} is a file the program tries to read and leak through its error or output; {marker} a file it
# tries to create. "rejected": the lint refuses it; "contained": it runs, and whatever it reaches is harmless.

BYPASSES = {
    "match_class_dunder": ("rejected", "match tokens:\n    case list(__class__=c):\n        pass"),
    "match_metaclass": ("rejected", "class M(type):\n    pass\nclass X(metaclass=M):\n    pass\n"
                                    "match X:\n    case M(__subclasses__=s):\n        pass"),
    "type_dunder_keys": ("rejected", "T = type('T', (), {'__getattr__': lambda s, n: n})"),
    "type_dunder_keywords": ("rejected", "T = type('T', (), dict(__init__=lambda s: None))"),
    "array_interface": ("rejected", "p = np.zeros(3).__array_interface__['data'][0]"),
    "array_struct": ("rejected", "p = np.zeros(3).__array_struct__"),
    "array_ctypes": ("rejected", "p = np.zeros(3).ctypes.data"),
    "ctypeslib": ("rejected", "f = np.ctypeslib.as_array"),
    "as_strided": ("rejected", "from numpy.lib.stride_tricks import as_strided"),
    "frombuffer_oob": ("contained", "a = np.ndarray((10 ** 6,), dtype=np.uint8, buffer=bytes(8))"),
    "code_object": ("rejected", "c = (lambda: 0).__code__"),
    "generator_frame": ("rejected", "g = (x for x in tokens)\nf = g.gi_frame.f_back.f_globals"),
    "traceback_walk": ("rejected", "try:\n    1 / 0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame"),
    "with_traceback": ("rejected", "try:\n    1 / 0\nexcept Exception as e:\n    e.with_traceback(None)"),
    "format_walk": ("rejected", "s = '{0.__class__.__mro__}'.format(tokens)"),
    "format_variable": ("rejected", "fmt = '{0.__class__}'\ns = fmt.format(tokens)"),
    "fstring_dunder": ("rejected", "s = f'{tokens.__class__}'"),
    "format_map": ("rejected", "s = '{x}'.format_map({'x': 1})"),
    "formatter_vformat": ("rejected", "import string\ns = string.Formatter().vformat('{0.x}', [1], {})"),
    "getattr_name": ("rejected", "c = getattr(tokens, '__class__')"),
    "vars_dir": ("rejected", "v = vars(np)"),
    "builtins_name": ("rejected", "o = __builtins__['open']"),
    "import_builtins": ("rejected", "import builtins"),
    "import_sandbox": ("rejected", "from attnprog.sandbox import Sandbox"),
    "fullwidth_open": ("rejected", "ｏｐｅｎ('{marker}', 'w')"),
    "subclasses_walk": ("rejected", "s = ().__class__.__base__.__subclasses__()"),
    "typing_sys": ("rejected", "import typing\nm = typing.sys.modules"),
    "random_internals": ("rejected", "b = np.random.bit_generator"),
    "string_annotation": ("contained", "import typing\ndef helper(x: \"__import__('os').system('touch {marker}')\"):\n"
                                       "    return x\ntyping.get_type_hints(helper)"),
    "helpers_module_walk": ("contained", "from attnprog import helpers\nm = helpers.linguistics.importlib"),
    "numpy_load_hidden": ("contained", "d = np.load('{secret}')"),
    "spacy_util": ("contained", "import spacy\nu = spacy.util.load_model"),
    "spacy_to_disk": ("rejected", "import spacy\nspacy.load('en_core_web_sm').to_disk('{marker}')"),
    "nltk_data_load": ("contained", "import nltk\ns = nltk.data.load('file:{secret}', format='raw')"),
    "nltk_corpus_reader": ("contained", "import nltk\nraise ValueError(nltk.corpus.PlaintextCorpusReader("
                                        "'{secret_dir}', 'secret.txt').raw())"),
    "exception_str_loop": ("contained", "class E(Exception):\n    def __str__(self):\n        while True:\n"
                                        "            pass\nraise E()"),
    "class_getattr_trick": ("contained", "class X:\n    def __getattribute__(self, name):\n        return name\n"
                                         "x = X().anything"),
    "decorator_closure": ("contained", "def deco(f):\n    return f\n@deco\ndef g():\n    return 1\ng()"),
    "regex_bomb": ("contained", "import re\nre.match(r'(a+)+$', 'a' * 40 + 'b')"),
}


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_python_level_bypasses_are_stopped_or_contained(strict, name, tmp_path, secret_file):
    expected, code = BYPASSES[name]
    marker = tmp_path / "marker"
    code = code.replace("{marker}", str(marker)).replace("{secret}", str(secret_file)) \
        .replace("{secret_dir}", str(secret_file.parent))
    run = attack(strict, in_attention(code))
    if expected == "rejected":
        assert run.status == "rejected", (run.status, run.error)
    assert "31415" not in (run.error or "")
    assert run.status != "ok" or np.array_equal(run.matrices[0], np.eye(len(EXAMPLE), dtype=np.float32))
    assert not marker.exists()
    assert still_serves(strict)
