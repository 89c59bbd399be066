"""The operating-system jail on its own: programs run with the Python-level guards off (`UNGUARDED`: real
builtins, any import, `os` and `ctypes`), which is a complete Python-level escape, and every check looks
from outside, at the host, for the effect the attack wanted.
"""
import os
import site
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import attnprog
from attnprog.programs import programs_from_source
from attnprog.runner import run_programs
from attnprog.sandbox import UNGUARDED, Limits, Sandbox

EXAMPLE = [" The", " cat", " sat", "."]
FAST = Limits(seconds_per_call=1.0, memory_mb=256)
NAMESPACES = ("user", "pid", "net", "ipc", "mnt", "uts", "cgroup")


@pytest.fixture(scope="module")
def jail():
    with Sandbox(workers=1, policy=UNGUARDED) as box:
        yield box


def escape(box, body: str, limits=FAST, name="attack"):
    """Run `body` (module-level code defining attention(tokens)) unguarded; return the ProgramRun."""
    source = "import numpy as np\nimport os, ctypes, ctypes.util\nlibc = ctypes.CDLL(None, use_errno=True)\n" + \
        textwrap.dedent(body)
    program = programs_from_source(source, name)[0]
    return run_programs([program], [EXAMPLE], sandbox=box, limits=limits)[name]


def reporting(code: str) -> str:
    """A program whose attention() runs `code`, which sets `report`, and fails with it as the message."""
    return "def attention(tokens):\n    report = ''\n" + textwrap.indent(textwrap.dedent(code), "    ") + \
        "\n    raise RuntimeError('REPORT ' + str(report))\n"


def report_of(run) -> str:
    assert run.status == "runtime_error" and "REPORT " in run.error, run.error
    return run.error.rsplit("REPORT ", 1)[1]


def still_serves(box) -> bool:
    run = escape(box, "def attention(tokens):\n    return np.eye(len(tokens))\n", name="probe")
    return run.status == "ok" and np.array_equal(run.matrices[0], np.eye(len(EXAMPLE), dtype=np.float32))


def worker_pid(box) -> int:
    """The host pid of the Python worker inside the (only) jail (bwrap's command line names it too)."""
    for pid in sorted(box.host_pids()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).startswith(b"python") and b"attnprog.sandbox.server" in argv[-2]:
            return pid
    raise AssertionError("no worker process found")


def status_fields(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)


# ---- what the jail is, seen from outside ----------------------------------------------------------------


def test_the_worker_is_unprivileged_and_confined_seen_from_the_host(jail):
    pid = worker_pid(jail)
    fields = {k: v.split() for k, v in status_fields(pid).items()}
    assert fields["Uid"] == ["65534"] * 4 and fields["Gid"] == ["65534"] * 4
    assert fields["Groups"] == []
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap][0], 16) == 0, cap
    assert fields["NoNewPrivs"] == ["1"] and fields["Seccomp"] == ["2"]
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # Its whole file system: system libraries, the Python installation and packages, its own /proc, /dev, /tmp.
    root = f"/proc/{pid}/root"
    # (the Python environment and attnprog's source may live anywhere: a CI checkout under /check, a venv in /home)
    python_tops = {Path(p).resolve().parts[1] for p in (sys.base_prefix, sys.executable, *site.getsitepackages(),
                                                       attnprog.__file__)}
    assert set(os.listdir(root)) <= {"usr", "lib", "lib64", "lib32", "libx32", "bin", "etc", "proc", "dev",
                                     "tmp"} | python_tops
    assert not os.path.exists(f"{root}/etc/passwd") and not os.path.exists(f"{root}/etc/shadow")
    assert os.listdir(f"{root}/etc") == ["ld.so.cache"]
    with open(f"/proc/{pid}/net/dev") as f:  # no network interface but the loopback of its own namespace
        assert [line.split(":")[0].strip() for line in f.read().splitlines()[2:]] == ["lo"]
    assert os.statvfs(f"{root}/usr").f_flag & os.ST_RDONLY


def test_a_program_child_is_confined_further(jail):
    # seen from inside (the report), then from outside while it runs
    report = report_of(escape(jail, reporting("""
        status = open('/proc/self/status').read()
        report = [line for line in status.splitlines() if line.startswith(('Uid', 'Seccomp_filters', 'CapEff'))]
        """)))
    assert "65534" in report and "Seccomp_filters:\\t2" in report and "CapEff:\\t0000000000000000" in report
    seen = {}

    def look():
        began = time.monotonic()
        while time.monotonic() - began < 3 and not seen:
            for pid in jail.host_pids():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        text = f.read()
                except OSError:
                    continue
                if "Seccomp_filters:\t2" in text:
                    seen.update({k: v.split() for k, v in
                                 (line.split(":", 1) for line in text.splitlines() if ":" in line)})
            time.sleep(0.01)

    watcher = threading.Thread(target=look)
    watcher.start()
    escape(jail, "import time\ndef attention(tokens):\n    time.sleep(1.5)\n    return np.eye(len(tokens))\n",
           limits=Limits(seconds_per_call=3, memory_mb=256))
    watcher.join()
    assert seen["Uid"] == ["65534"] * 4 and seen["NoNewPrivs"] == ["1"] and seen["Seccomp"] == ["2"]
    assert int(seen["CapEff"][0], 16) == 0


# ---- files -----------------------------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("31415 92653\n")
    path.chmod(0o644)
    return path


def test_a_secret_file_is_unreadable(jail, secret_file):
    run = escape(jail, reporting(f"""
        found = []
        for path in ({str(secret_file)!r}, '/proc/1/root' + {str(secret_file)!r}, '/etc/shadow', '/root/.bashrc'):
            try:
                found.append(open(path).read())
            except OSError as e:
                found.append(type(e).__name__)
            fd = libc.open(path.encode(), 0)
            found.append(str(fd))
        report = found
        """))
    assert "31415" not in run.error and "root:" not in run.error
    assert "FileNotFoundError" in report_of(run)


def test_no_file_appears_anywhere(jail, tmp_path):
    token = f"attnprog-escape-{os.getpid()}-{time.monotonic_ns()}"
    targets = [tmp_path / token, f"/tmp/{token}", f"/dev/shm/{token}", f"/var/tmp/{token}", f"./{token}",
               f"/{token}"]
    before = {d: set(os.listdir(d)) for d in ("/tmp", "/dev/shm", "/var/tmp") if os.path.isdir(d)}
    run = escape(jail, reporting(f"""
        results = []
        for path in {[str(t) for t in targets]!r}:
            for attempt in (lambda: open(path, 'w').write('x'), lambda: os.mkdir(path + '.d'),
                            lambda: libc.open(path.encode(), 0o101, 0o644)):  # O_WRONLY | O_CREAT
                try:
                    results.append(str(attempt()))
                except OSError as e:
                    results.append(e.strerror)
        report = results
        """))
    assert "Operation not permitted" in report_of(run)
    for target in targets[:1]:
        assert not os.path.exists(target)
    for d, names in before.items():
        assert not [n for n in set(os.listdir(d)) - names if token in n], d
    assert not os.path.exists(f"/{token}")


# ---- network, signals, other programs ---------------------------------------------------------------------


def test_a_listener_on_localhost_receives_nothing(jail):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.3)
    port = server.getsockname()[1]
    try:
        run = escape(jail, reporting(f"""
            import socket
            results = []
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=0.5)
            except OSError as e:
                results.append(e.strerror)
            results.append(libc.socket(2, 1, 0))  # AF_INET, SOCK_STREAM through libc
            report = results
            """))
        assert "Operation not permitted" in report_of(run)
        with pytest.raises((socket.timeout, TimeoutError)):
            server.accept()
    finally:
        server.close()


def test_the_parent_and_other_processes_are_not_signalled(jail):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        worker = worker_pid(jail)
        run = escape(jail, reporting(f"""
            import signal
            results = []
            for pid in ({os.getpid()}, {bystander.pid}, {worker}, os.getppid(), 1, -1, 0):
                try:
                    os.kill(pid, signal.SIGKILL)
                    results.append('sent')
                except OSError as e:
                    results.append(e.strerror)
                results.append(libc.kill(pid, 9))
            try:
                os.killpg(0, signal.SIGKILL)
            except OSError as e:
                results.append(e.strerror)
            report = results
            """))
        assert "sent" not in report_of(run)
        time.sleep(0.2)
        assert bystander.poll() is None and worker_pid(jail) == worker and still_serves(jail)
    finally:
        bystander.kill()
        bystander.wait()


def test_a_second_program_cannot_read_what_the_first_left(jail):
    key = 0x5A17
    first = escape(jail, reporting(f"""
        results = []
        for path in ('/tmp/left', '/dev/shm/left', '/dev/shm/sem.left'):
            try:
                with open(path, 'w') as f:
                    f.write('LEFT-BEHIND')
                results.append('wrote')
            except OSError as e:
                results.append(e.strerror)
        shm = libc.shmget({key}, 4096, 0o1666)  # IPC_CREAT | 0666
        results.append(shm)
        results.append(libc.mq_open(b'/left', 0o100 | 2, 0o666, None) if hasattr(libc, 'mq_open') else -1)
        report = results
        """), name="first")
    assert "wrote" not in report_of(first) and "-1" in report_of(first)
    second = escape(jail, reporting(f"""
        results = []
        for path in ('/tmp/left', '/dev/shm/left', '/dev/shm/sem.left'):
            try:
                results.append(open(path).read())
            except OSError as e:
                results.append(e.strerror)
        results.append(libc.shmget({key}, 0, 0))
        report = results
        """), name="second")
    assert "LEFT-BEHIND" not in second.error
    assert "No such file" in report_of(second)


# ---- mounts and namespaces ----------------------------------------------------------------------------------


def test_no_mount_happens(jail):
    pid = worker_pid(jail)
    with open("/proc/self/mountinfo") as f:
        host_before = f.read()
    with open(f"/proc/{pid}/mountinfo") as f:
        jail_before = f.read()
    run = escape(jail, reporting("""
        results = [libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno(),
                   libc.unshare(0x10020000), libc.chroot(b'/tmp'), libc.umount2(b'/usr', 2),
                   libc.syscall(428, -100, b'/', 0), libc.syscall(432, b'tmpfs', 0)]  # open_tree, fsopen
        report = results
        """))
    assert report_of(run).startswith("[-1, 1,")  # EPERM
    with open("/proc/self/mountinfo") as f:
        assert f.read() == host_before
    with open(f"/proc/{pid}/mountinfo") as f:
        assert f.read() == jail_before


# ---- bombs ------------------------------------------------------------------------------------------------


def processes_of_uid(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def test_process_and_thread_bombs_are_contained(jail):
    before = processes_of_uid(65534)
    run = escape(jail, reporting("""
        import threading
        results = []
        for _ in range(50):
            try:
                results.append(os.fork())
            except OSError as e:
                results.append(e.strerror)
                break
        try:
            threading.Thread(target=lambda: None).start()
        except RuntimeError as e:
            results.append(str(e))
        results.append(libc.syscall(56, 17, 0, 0, 0, 0))  # raw clone(SIGCHLD)
        report = results
        """))
    report = report_of(run)
    assert "Operation not permitted" in report or "Resource temporarily unavailable" in report
    assert "can't start new thread" in report
    time.sleep(0.2)
    assert processes_of_uid(65534) <= before and still_serves(jail)


@pytest.mark.parametrize("code, status", [
    ("keep = [bytearray(2 ** 24) for _ in range(1000)]", "memory"),
    ("libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
     "if not libc.malloc(2 ** 33):\n    raise MemoryError", "memory"),
    ("while True:\n    pass", "timeout"),
    ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass", "timeout"),
])
def test_memory_and_cpu_bombs_are_contained(jail, code, status):
    began = time.monotonic()
    run = escape(jail, "def attention(tokens):\n" + textwrap.indent(code, "    ") + "\n    return np.eye(len(tokens))\n",
                 limits=Limits(seconds_per_call=1.0, memory_mb=128))
    assert run.status == status and run.matrices == [None]
    assert time.monotonic() - began < 10 and still_serves(jail)


# ---- the result channel -------------------------------------------------------------------------------------


def test_forged_and_garbage_frames_spoil_only_that_program(jail):
    import struct
    n = len(EXAMPLE)
    forged = [
        struct.pack("<iiiq", 0, 0, 0, 10 ** 12),                         # 1 TB of matrix announced
        struct.pack("<iiiq", 999, 0, 0, 4 * n * (n + 1) // 2) + bytes(40),  # another job's frame
        struct.pack("<iiiq", 0, 5, 0, 0),                                # out of order
        struct.pack("<iiiq", 0, 0, 77, 0),                               # unknown status
        b"garbage" * 1000,
    ]
    for data in forged:
        run = escape(jail, f"def attention(tokens):\n    os.write(3, {data!r})\n    while True:\n        pass\n")
        assert run.status in ("bad_output", "timeout") and run.matrices == [None], data[:20]
    unnormalised = struct.pack("<iiiq", 0, 0, 0, 4 * n * (n + 1) // 2) + \
        np.full(n * (n + 1) // 2, 5.0, np.float32).tobytes()
    run = escape(jail, "import re\n" + f"def attention(tokens):\n    os.write(3, {unnormalised!r})\n"
                 "    os._exit(0)\n")
    assert run.status in ("bad_output", "runtime_error") and run.matrices == [None]
    assert still_serves(jail)


def test_closing_the_pipe_filling_it_and_hanging_are_contained(jail):
    for code in ("os.close(3)\n    while True:\n        pass", "os.write(1, b'x' * 10 ** 7)\n    os.write(2, b'y' * 10 ** 7)",
                 "libc.pause()"):
        began = time.monotonic()
        run = escape(jail, f"def attention(tokens):\n    {code}\n    return np.eye(len(tokens))\n")
        assert run.matrices[0] is None or run.status == "ok"
        assert time.monotonic() - began < 8
    assert still_serves(jail)


def test_a_worker_that_dies_is_replaced(jail):
    pid = worker_pid(jail)
    os.kill(pid, 9)  # as if the worker itself had been broken into
    time.sleep(0.1)
    run = escape(jail, "def attention(tokens):\n    return np.eye(len(tokens))\n")
    assert run.status == "ok" or still_serves(jail)
    assert still_serves(jail) and worker_pid(jail) != pid


def test_the_jail_dies_with_its_parent(tmp_path):
    script = ("import os, sys, time\nfrom attnprog.sandbox import Sandbox\nbox = Sandbox(workers=1)\n"
              "print(' '.join(map(str, box.host_pids())), flush=True)\ntime.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) >= 3 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    parent.kill()
    parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return "zombie" not in f.read()
        except OSError:
            return False

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not [pid for pid in pids if alive(pid)]


# ---- where the checkout and the environment live ---------------------------------------------------------

IN_TMP_CHECK = r'''
import json, os, sys
import attnprog, numpy
from attnprog.sandbox import UNGUARDED, Job, Sandbox
root = sys.argv[1]
assert attnprog.__file__.startswith(root) and numpy.__file__.startswith(root), (attnprog.__file__, numpy.__file__)
program = ("import attnprog, numpy\ndef attention(tokens):\n"
           "    raise RuntimeError('REPORT ' + repr([attnprog.__file__, numpy.__file__]))\n")
with Sandbox(workers=1, policy=UNGUARDED) as box:
    run = box.run(Job(program, "p.py", "attention", "tokens", [(["a", "b"], "a b")]))
    ok = box.run(Job("import numpy as np\ndef attention(tokens):\n    return np.eye(len(tokens))\n", "q.py",
                     "attention", "tokens", [(["a", "b"], "a b")]))
    worker = [pid for pid in box.host_pids()
              if b"attnprog.sandbox.server" in open(f"/proc/{pid}/cmdline", "rb").read()][-1]
    mounts = open(f"/proc/{worker}/mountinfo").read()
    read_only = [os.statvfs(f"/proc/{worker}/root{os.path.dirname(p)}").f_flag & os.ST_RDONLY != 0
                 for p in (attnprog.__path__[0], numpy.__path__[0])]
print(json.dumps({"error": run.error, "ok": ok.status, "mounts": mounts, "read_only": read_only}))
'''


def test_the_jail_runs_from_a_checkout_and_an_environment_under_tmp():
    """A checkout and a Python environment under /tmp (a CI clone, a user's scratch folder): the jail's own
    /tmp must not hide them, and they stay read-only inside."""
    import ast
    import json
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="attnprog-tmp-check-", dir="/tmp"))  # 0700, as a clone in a private folder
    try:
        shutil.copytree(Path(attnprog.__file__).parent, root / "src" / "attnprog",
                        ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
                        str(root / "venv")], check=True)
        packages = next((root / "venv" / "lib").glob("python3*/site-packages"))
        here = Path(np.__file__).parent.parent

        def link_or_copy(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        for name in ("numpy", "numpy.libs"):
            if (here / name).is_dir():
                shutil.copytree(here / name, packages / name, copy_function=link_or_copy,
                                ignore=shutil.ignore_patterns("tests", "__pycache__"))
        import pyseccomp
        shutil.copy2(pyseccomp.__file__, packages / "pyseccomp.py")
        out = subprocess.run([str(root / "venv" / "bin" / "python"), "-c", IN_TMP_CHECK, str(root)],
                             capture_output=True, text=True, cwd=root, timeout=120,
                             env={"PATH": os.environ["PATH"], "PYTHONPATH": str(root / "src")})
        assert out.returncode == 0, out.stderr[-2000:]
        seen = json.loads(out.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(root)
    assert seen["ok"] == "ok"
    files = ast.literal_eval(seen["error"].rsplit("REPORT ", 1)[1])
    assert files[0] == f"{root}/src/attnprog/__init__.py"
    assert files[1].startswith(f"{root}/venv/lib/") and files[1].endswith("/site-packages/numpy/__init__.py")
    assert seen["read_only"] == [True, True]
    # Every mount is read-only but the jail's own /tmp, /proc and /dev (and /dev/null over hidden /proc files).
    writable = [(line.split()[4], line.split()[3]) for line in seen["mounts"].splitlines()
                if line.split()[5].split(",")[0] == "rw"]
    assert ("/tmp", "/") in writable
    assert all(p in ("/tmp", "/proc") or p.startswith("/dev") or (p.startswith("/proc/") and root_ == "/null")
               for p, root_ in writable), writable
    under_tmp = [line.split()[4] for line in seen["mounts"].splitlines() if line.split()[4].startswith(str(root))]
    assert len(under_tmp) == 2, under_tmp


# ---- programs see nothing of each other ----------------------------------------------------------------------

MEMORY_SCAN = r"""
import re
def attention(tokens):
    marker = 'MARK' + str(40000 + 2) + 'ER'  # built at run time: a positive control for the scan
    patterns = [re.compile(p.encode()) for p in ({secret_pattern!r}, 'MARK4000[2]ER')]
    found = [0, 0]
    with open('/proc/self/maps') as maps:
        regions = [line.split() for line in maps.read().splitlines()]
    for region in regions:  # anonymous memory (the heap, arenas, large objects, stacks): read in place
        if not region[1].startswith('r') or (len(region) > 5 and region[5] not in ('[heap]', '[stack]')):
            continue
        start, end = (int(x, 16) for x in region[0].split('-'))
        for position in range(start, end, 1 << 22):
            chunk = ctypes.string_at(position, min(end - position, (1 << 22) + 64))
            for i, pattern in enumerate(patterns):
                found[i] += len(pattern.findall(chunk))
    raise RuntimeError('REPORT ' + repr(found) + marker[:0])
"""


def test_a_later_program_finds_no_earlier_programs_source_in_its_memory(jail):
    secret = f"Q7Z-{os.getpid()}-{time.monotonic_ns()}-SECRET"
    first = escape(jail, f"def attention(tokens):\n    key = {secret!r}\n    return np.eye(len(tokens))\n"
                   f"# {secret} in a comment too\n", name="first")
    assert first.status == "ok"
    # A regex with a character class: the pattern's own text is not the secret, so only a copy of the
    # first program's source can match.
    pattern = secret[:-1].replace("-", "\\-") + "[" + secret[-1] + "]"
    run = escape(jail, MEMORY_SCAN.format(secret_pattern=pattern), name="scan",
                 limits=Limits(seconds_per_call=20, memory_mb=256))
    secret_copies, markers = ast_literal(report_of(run))
    assert markers > 0  # the scan reads the program's whole memory
    assert secret_copies == 0


def ast_literal(text: str):
    import ast
    return ast.literal_eval(text)


def test_proc_shows_nothing_of_the_host_a_program_does_not_need(jail):
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    with open("/proc/cmdline") as f:
        kernel_cmdline = f.read().strip()
    report = report_of(escape(jail, reporting("""
        seen = {}
        for path in ('/proc/1/cmdline', '/proc/self/cmdline', '/proc/1/environ', '/proc/cmdline', '/proc/version',
                     '/proc/loadavg', '/proc/meminfo', '/proc/stat', '/proc/uptime', '/proc/pressure/cpu',
                     '/proc/sys/kernel/random/boot_id', '/proc/sys/kernel/osrelease'):
            try:
                seen[path] = open(path).read()
            except OSError as e:
                seen[path] = type(e).__name__
        seen['cwd'] = [os.getcwd()] + [os.readlink(f'/proc/{p}/cwd') for p in (1, 'self')]
        seen['sys'] = os.listdir('/proc/sys')
        seen['sysinfo'] = libc.sysinfo(ctypes.create_string_buffer(128))
        report = repr(seen)
        """)))
    import ast
    seen = ast.literal_eval(report)
    assert boot_id not in report and kernel_cmdline not in report
    assert seen["cwd"] == ["/", "/", "/"] and seen["sys"] == []
    for path in ("/proc/cmdline", "/proc/version", "/proc/loadavg", "/proc/meminfo", "/proc/stat", "/proc/uptime"):
        assert seen[path] == "", path
    assert seen["/proc/sys/kernel/random/boot_id"] == "FileNotFoundError"
    assert seen["/proc/pressure/cpu"] in ("FileNotFoundError", "")
    # bwrap's own command line holds no option, no bound path, no environment
    assert "--ro-bind" not in seen["/proc/1/cmdline"] and "--setenv" not in seen["/proc/1/cmdline"]
    for folder in {str(Path(attnprog.__file__).resolve().parents[1]), os.getcwd()}:
        assert folder not in seen["/proc/1/cmdline"] and folder not in seen["/proc/self/cmdline"]
    assert seen["sysinfo"] == -1  # host-wide memory and load through the system call: refused


def test_bytes_after_a_good_result_fail_only_that_program(jail):
    pid = worker_pid(jail)
    run = escape(jail, """
        import sys
        from attnprog.sandbox import channel
        from attnprog.matrices import tril_indices
        def attention(tokens):
            frame = sys._getframe()
            while 'job' not in frame.f_locals:
                frame = frame.f_back
            n = len(tokens)
            good = channel.encode(frame.f_locals['job']['job_id'], 0, 'ok', np.eye(n, dtype=np.float32)[tril_indices(n)])
            os.write(3, good + b'trailing bytes')
            os._exit(0)
        """)
    assert run.status == "bad_output" and run.matrices == [None] and "after the end" in run.error
    assert worker_pid(jail) == pid and still_serves(jail)  # the jail was not restarted


def test_the_worker_runs_under_limits_it_cannot_raise(jail):
    from attnprog.sandbox.jail import WORKER_ADDRESS_SPACE, WORKER_CPU_SECONDS, WORKER_FILES
    with open(f"/proc/{worker_pid(jail)}/limits") as f:
        limits = {line[:26].strip(): line[26:].split()[:2] for line in f.read().splitlines()[1:]}
    assert limits["Max address space"] == [str(WORKER_ADDRESS_SPACE)] * 2
    assert limits["Max cpu time"] == [str(WORKER_CPU_SECONDS), str(WORKER_CPU_SECONDS + 60)]
    assert limits["Max open files"] == [str(WORKER_FILES)] * 2
    assert limits["Max core file size"] == ["0", "0"]
    if os.geteuid() == 0:
        assert limits["Max processes"][1] != "unlimited"
    report = report_of(escape(jail, reporting("""
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            report = 'raised'
        except (ValueError, OSError) as e:
            report = type(e).__name__
        """)))
    assert report != "raised"
