"""Escape and abuse attempts against the sandbox. Each test checks that the attack's *effect* did not happen
(the file was not written, the secret did not come back, the server survived, no connection arrived), not
only that the run failed.

The workflow runs untrusted code with every layer on (`strict`). To show that each lower layer holds on its
own, some attacks run again with the layers above switched off: `audit_only` (no static validation, extra
modules importable), `seccomp_only` (no validation, no audit hook) and `limits_only` (rlimits only).
"""
import os
import socket
import textwrap
import time
import types
import warnings

import numpy as np
import pytest

from attnprog.programs import programs_from_source
from attnprog.runner import run_programs
from attnprog.sandbox import (ALLOWED_IMPORTS, DENIED_ATTRIBUTES, Limits, Policy, ProgramError, Sandbox,
                              module_table, validate_source)

EXAMPLE = [" The", " cat", " sat", "."]
FAST = Limits(seconds_per_call=0.5, memory_mb=256)
ROOMY = Limits(seconds_per_call=5, memory_mb=128)  # for attacks that are slow to fill memory on a small VM
# Modules the weakened policies let programs import, to reach the dangerous calls directly.
EXTRA = ("os", "io", "sys", "subprocess", "ctypes", "socket", "signal", "_posixsubprocess")


def start(**policy) -> Sandbox:
    return Sandbox(workers=1, policy=Policy(**policy))


@pytest.fixture(scope="module")
def strict():
    with start() as box:
        yield box


@pytest.fixture(scope="module")
def audit_only():
    with start(validate=False, seccomp=False, allowed_imports=ALLOWED_IMPORTS + EXTRA) as box:
        yield box


@pytest.fixture(scope="module")
def seccomp_only():
    with start(validate=False, audit=False, allowed_imports=ALLOWED_IMPORTS + EXTRA) as box:
        if not box.seccomp:
            pytest.skip("libseccomp (libseccomp2) is not installed: the seccomp layer is off on this system")
        yield box


@pytest.fixture(scope="module")
def limits_only():
    with start(validate=False, audit=False, seccomp=False, allowed_imports=ALLOWED_IMPORTS + EXTRA) as box:
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
    """The server answers the next program correctly (it was not killed, blocked or confused)."""
    run = attack(box, in_attention("pass"))
    return run.status == "ok" and np.array_equal(run.matrices[0], np.eye(len(EXAMPLE), dtype=np.float32))


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("31415 92653\n")
    return path


@pytest.fixture
def listener():
    """A local TCP server that should never see a connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    yield server
    server.close()


def connection_arrived(server) -> bool:
    try:
        conn, _ = server.accept()
    except (socket.timeout, TimeoutError):
        return False
    conn.close()
    return True


# ---- files ---------------------------------------------------------------------------------------------


def test_writing_a_file_is_stopped(strict, audit_only, tmp_path):
    target = tmp_path / "pwned.txt"
    run = attack(strict, in_attention(f"open({str(target)!r}, 'w').write('pwned')"))
    assert run.status == "rejected" and "open" in run.error
    run = attack(audit_only, in_attention(f"import io\nio.FileIO({str(target)!r}, 'w').write(b'pwned')"))
    assert run.status == "runtime_error" and "'open' is not allowed" in run.error
    assert not target.exists()


def test_reading_a_secret_file_is_stopped(strict, audit_only, secret_file):
    run = attack(strict, in_attention(f"data = open({str(secret_file)!r}).read()"))
    assert run.status == "rejected"
    run = attack(audit_only, f"""
        import io
        SECRET = io.FileIO({str(secret_file)!r}).read().decode()
        def attention(tokens):
            raise ValueError(SECRET)
        """)
    assert run.status == "runtime_error" and "'open' is not allowed" in run.error
    assert "31415" not in run.error and run.matrices == [None]


def test_numpy_file_io_is_stopped(strict, audit_only, secret_file, tmp_path):
    target = tmp_path / "saved.npy"
    for code in (f"np.save({str(target)!r}, np.zeros(3))", f"secret = np.loadtxt({str(secret_file)!r})",
                 f"np.zeros(3).tofile({str(target)!r})"):
        assert attack(strict, in_attention(code)).status == "rejected"
    # Without validation a program can reach the real numpy through sys; the audit hook refuses the file I/O.
    for code in (f"raise ValueError(real_numpy.loadtxt({str(secret_file)!r}))",
                 f"real_numpy.save({str(target)!r}, np.zeros(3))",
                 f"real_numpy.zeros(3).tofile({str(target)!r})"):
        run = attack(audit_only, "import sys\nreal_numpy = sys.modules['numpy']\n" + in_attention(code))
        # (numpy's C code for tofile swallows the PermissionError and reports a SystemError instead)
        assert run.status == "runtime_error" and ("is not allowed" in run.error or "SystemError" in run.error)
        assert "31415" not in run.error
    assert not target.exists()


# ---- processes, network, native code -------------------------------------------------------------------


@pytest.mark.parametrize("statement", ["import os", "import subprocess", "import socket", "import ctypes",
                                       "import importlib", "from os import system", "import numpy.testing",
                                       "from numpy import ctypeslib", "import attnprog.sandbox"])
def test_importing_dangerous_modules_is_rejected(strict, statement, tmp_path):
    marker = tmp_path / "marker"
    run = attack(strict, statement + "\n" + in_attention(f"open({str(marker)!r}, 'w')"))
    assert run.status == "rejected" and "not allowed" in run.error
    assert not marker.exists()


def test_dunder_walk_to_os_system_is_stopped(strict, audit_only, tmp_path):
    marker = tmp_path / "marker"
    walk = f"""
        for cls in ().__class__.__base__.__subclasses__():
            if cls.__name__ == "_wrap_close":
                cls.__init__.__globals__["system"]("touch {marker}")
        """
    run = attack(strict, in_attention(walk))
    assert run.status == "rejected" and "dunder" in run.error
    run = attack(audit_only, in_attention(walk))  # the walk works without validation; the call does not
    assert run.status == "runtime_error" and "'os.system' is not allowed" in run.error
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


def test_attribute_walks_through_allowed_modules_are_stopped(strict, audit_only, tmp_path):
    marker = tmp_path / "marker"
    # numpy.ma.core imports builtins; typing imports sys; the helpers import string (str.format walks)
    for code in (f"np.ma.core.builtins.open({str(marker)!r}, 'w')",
                 "import typing\ntyping.sys.modules['os'].system('true')",
                 "from attnprog import helpers\nhelpers.string.Formatter().vformat('{0.__class__}', [1], {})"):
        assert attack(strict, in_attention(code)).status == "rejected", code
    # Without validation the module views simply do not have those attributes.
    run = attack(audit_only, in_attention(f"np.ma.core.builtins.open({str(marker)!r}, 'w')"))
    assert run.status == "runtime_error" and "has no attribute 'ma'" in run.error
    run = attack(audit_only, in_attention("import attnprog.helpers\nattnprog.programs.load_programs('/')"))
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


def test_frame_walks_are_stopped(strict, audit_only):
    code = "g = (x for x in tokens)\nleak = g.gi_frame.f_back.f_globals"
    assert attack(strict, in_attention(code)).status == "rejected"
    run = attack(audit_only, in_attention(code))
    assert run.status == "runtime_error" and "'object.__getattr__' is not allowed" in run.error


def test_code_hidden_in_a_string_annotation_is_stopped(strict, tmp_path):
    # The validator does not read strings; typing.get_type_hints would eval this one. The audit hook stops it.
    marker = tmp_path / "marker"
    run = attack(strict, f"""
        import typing
        def helper(x: "__import__('os').system('touch {marker}')"):
            return x
        def attention(tokens):
            typing.get_type_hints(helper)
            return np.eye(len(tokens))
        """)
    assert run.status == "runtime_error" and "is not allowed" in run.error
    assert not marker.exists()


def test_shell_commands_are_stopped(audit_only, tmp_path):
    marker = tmp_path / "marker"
    for code in (f"import os\nos.system('touch {marker}')",
                 f"import subprocess\nsubprocess.run(['touch', '{marker}'])",
                 f"import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])",
                 f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})"):
        run = attack(audit_only, in_attention(code))
        assert run.status == "runtime_error" and "is not allowed" in run.error, code
    assert not marker.exists()


def test_fork_is_stopped(audit_only):
    run = attack(audit_only, in_attention("import os\npid = os.fork()\nif pid == 0:\n    while True: pass"))
    assert run.status == "runtime_error" and "'os.fork' is not allowed" in run.error
    assert still_serves(audit_only)


def test_killing_the_server_is_stopped(audit_only):
    pids = audit_only.server_pids()
    run = attack(audit_only, in_attention("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"))
    assert run.status == "runtime_error" and "'os.kill' is not allowed" in run.error
    assert audit_only.server_pids() == pids and still_serves(audit_only)


def test_ctypes_is_stopped(audit_only, tmp_path):
    marker = tmp_path / "marker"
    run = attack(audit_only, in_attention(f"import ctypes\nctypes.CDLL(None).system(b'touch {marker}')"))
    assert run.status == "runtime_error" and "'ctypes.dlopen' is not allowed" in run.error
    assert not marker.exists()


def test_network_is_stopped(audit_only, listener):
    port = listener.getsockname()[1]
    run = attack(audit_only, in_attention(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))"))
    assert run.status == "runtime_error" and "is not allowed" in run.error
    assert not connection_arrived(listener)


def test_api_keys_in_the_environment_do_not_reach_programs(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-secret")
    with start(validate=False, allowed_imports=ALLOWED_IMPORTS + EXTRA) as box:
        run = attack(box, """
            import os
            KEY = os.environ.get("ANTHROPIC_API_KEY", "")
            def attention(tokens):
                if KEY:
                    raise ValueError(KEY)
                return np.eye(len(tokens))
            """)
    assert run.status == "ok"  # the program ran and found nothing to leak


# ---- the result channel ----------------------------------------------------------------------------------


def test_writing_into_the_servers_pipes_is_harmless(audit_only):
    run = attack(audit_only, in_attention("""
        import os
        for fd in range(0, 64):
            try:
                os.write(fd, b"garbage" * 100)
            except OSError:
                pass
        """))
    assert run.status in ("bad_output", "ok")  # whatever it sent on its own result pipe
    assert still_serves(audit_only)


def test_forged_result_frames_are_dropped(audit_only):
    import struct
    huge = struct.pack("<iiq", 0, 0, 10 ** 12)  # "ok, and here come 1 TB of matrix"
    run = attack(audit_only, in_attention(f"import os\nos.write(3, {huge!r})\nwhile True: pass"))
    assert run.status == "bad_output" and run.matrices == [None]
    n = len(EXAMPLE)
    fake = struct.pack("<iiq", 0, 0, 4 * n * (n + 1) // 2) + np.full(n * (n + 1) // 2, 5.0, np.float32).tobytes()
    run = attack(audit_only, in_attention(f"import os\nos.write(3, {fake!r})\nwhile True: pass"))
    assert run.status == "bad_output" and "not a normalised matrix" in run.error
    assert still_serves(audit_only)


def test_one_program_cannot_touch_the_next(strict):
    spoiler = programs_from_source("import numpy as np\nnp.eye = None\nnp.zeros = None\n" +
                                   in_attention("pass").replace("np.eye(len(tokens))", "1"), "spoiler")
    victim = programs_from_source("import numpy as np\n" + in_attention("pass"), "victim")
    runs = run_programs(spoiler + victim, [EXAMPLE], sandbox=strict, limits=FAST)
    assert runs["spoiler"].status == "bad_output"
    assert runs["victim"].status == "ok" and np.array_equal(runs["victim"].matrices[0], np.eye(4))


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


def test_ignoring_the_cpu_limit_signal_does_not_help(audit_only):
    began = time.monotonic()
    run = attack(audit_only, in_attention("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
                                          "while True:\n    pass"))
    assert run.status == "timeout" and time.monotonic() - began < 5 * FAST.seconds_per_call + 1


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
    huge = "import numpy as np\n" + "# filler\n" * 20_000 + in_attention("pass")
    program = programs_from_source(huge, "huge")[0]
    run = run_programs([program], [EXAMPLE], sandbox=strict, limits=FAST)["huge"]
    assert run.status == "rejected" and "longer than" in run.error


# ---- the lower layers on their own ------------------------------------------------------------------------


def test_seccomp_stops_processes_files_and_network_without_the_audit_hook(seccomp_only, tmp_path, listener,
                                                                          secret_file):
    marker = tmp_path / "marker"
    port = listener.getsockname()[1]
    for code, error in ((f"import os\nos.system('touch {marker}') and os.fork()", "Operation not permitted"),
                        ("import os\nos.fork()", "Operation not permitted"),
                        (f"import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])", "Operation not permitted"),
                        (f"import io\nio.FileIO({str(marker)!r}, 'w')", "Operation not permitted"),
                        (f"import socket\nsocket.create_connection(('127.0.0.1', {port}))", "Operation not permitted"),
                        ("import os\nos.kill(os.getppid(), 9)", "Operation not permitted")):
        run = attack(seccomp_only, in_attention(code))
        assert run.status == "runtime_error" and error in run.error, code
    run = attack(seccomp_only, in_attention(f"import io\nraise ValueError(io.FileIO({str(secret_file)!r}).read())"))
    assert run.status == "runtime_error" and "Operation not permitted" in run.error and "31415" not in run.error
    # _posixsubprocess.fork_exec starts processes without any audit event: only seccomp stands in the way
    run = attack(seccomp_only, in_attention(f"import subprocess\nsubprocess.run(['touch', '{marker}'])"))
    assert run.status == "runtime_error"
    assert not marker.exists() and not connection_arrived(listener) and still_serves(seccomp_only)


def test_file_size_limit_stops_writes_even_for_root(limits_only, tmp_path):
    target = tmp_path / "written.bin"
    run = attack(limits_only, in_attention(f"import io\nio.FileIO({str(target)!r}, 'w').write(b'x' * 1000)"))
    assert run.status == "runtime_error" and "File too large" in run.error  # EFBIG: Python ignores SIGXFSZ
    assert not target.exists() or target.stat().st_size == 0  # not one byte got through
    assert still_serves(limits_only)


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


def test_closing_the_result_pipe_and_hanging_is_stopped(audit_only):
    began = time.monotonic()
    run = attack(audit_only, in_attention("import os\nos.close(3)\nwhile True:\n    pass"))
    assert run.status == "runtime_error" and "closed its result pipe" in run.error
    assert time.monotonic() - began < 3 and still_serves(audit_only)
