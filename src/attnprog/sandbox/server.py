"""The warm worker: runs inside the jail, keeps numpy, the helpers, the tokenizer and (once a program asks)
spaCy and NLTK loaded, and forks one child per program run.

Requests come from the host on stdin as pickles (the host is trusted); results go back on stdout only as
frames (channel.py), which the host parses without trusting them. The worker never runs program code
itself, nor keeps any: a program's text (only the lines it needs) arrives with its job as raw bytes, the
worker prepares the libraries and parses the program will read, forks, and wipes its copy, so a later
program finds no earlier one in the memory it inherits. The child cuts itself off (descriptors, resource
limits, a tighter seccomp filter) before it compiles the program.
The worker is not dumpable, so a child (same uid) cannot read or write its memory through /proc.
"""
import builtins
import ctypes
import gc
import os
import pickle
import resource
import select
import signal
import struct
import sys
import time
import warnings

import numpy as np

from ..matrices import tril_indices
from ..programs import ProgramError, call_program, describe_exception
from . import channel
from .jail import RESULT_FD, FilterLoader, program_rlimits
from .namespace import ModuleTable, ReferenceTokenizer, safe_builtins

_PR_SET_DUMPABLE = 4


def read_message(fd: int):
    (n,) = struct.unpack("<q", _read_exact(fd, 8))
    return pickle.loads(_read_exact(fd, n))


def _read_into(fd: int, buffer: bytearray) -> None:
    """Fill `buffer` from `fd` in place (no intermediate copies left in the heap)."""
    view, done = memoryview(buffer), 0
    while done < len(buffer):
        n = os.readv(fd, [view[done:]])
        if not n:
            raise EOFError
        done += n


def write_message(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, struct.pack("<q", len(data)) + data)


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 22))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Worker:
    def __init__(self, setup: dict, out_fd: int):
        self.out_fd = out_fd
        self.policy = setup["policy"]
        self.tokenizer = _load_tokenizer(setup["tokenizer_files"]) if setup["tokenizer_files"] else None
        self.modules = ModuleTable(self.policy.allowed_imports) if self.policy.python_guards else None
        self.filter = FilterLoader(setup["program_filter"])

    def send(self, job_id: int, index: int, status: str, payload=b"") -> None:
        _write_all(self.out_fd, channel.encode(job_id, index, status, payload))

    def prepare(self, job: dict) -> None:
        """Load what the program imports and the parses it will read, here, so every later child shares them."""
        imports = job["imports"]
        if self.modules is not None:
            self.modules.load(imports)
        wants_spacy = bool({"spacy", "en_core_web_sm"} & {name.split(".")[0] for name in imports})
        if job["linguistic"] or wants_spacy:
            from .. import linguistics
            last_beat = time.monotonic()
            for tokens, text in job["calls"]:
                if job["linguistic"]:
                    linguistics.prepare([tokens])
                if wants_spacy and text:
                    linguistics.parse(text)
                if time.monotonic() - last_beat > 1:
                    self.send(job["job_id"], channel.HEARTBEAT, "ok")
                    last_beat = time.monotonic()
        self.send(job["job_id"], channel.HEARTBEAT, "ok")

    def run(self, job: dict, text: bytearray) -> None:
        """Run one program: `text` is its source (only the lines it needs), which only its child decodes;
        the worker wipes its copy once the child has forked, so no later program finds it here."""
        job_id, calls = job["job_id"], job["calls"]
        try:
            self.prepare(job)
        except Exception as e:
            text[:] = bytes(len(text))
            return self._fail_from(job_id, 0, len(calls), "runtime_error",
                                   f"could not prepare the program's libraries: {type(e).__name__}: {e}")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child_main(self, job, text, write_fd, used)
        text[:] = bytes(len(text))
        os.close(write_fd)
        self._relay(job, pid, read_fd)

    def _fail_from(self, job_id, start, m, status, message) -> None:
        for i in range(start, m):
            self.send(job_id, i, status, message)
        self.send(job_id, channel.END, "ok")

    def _relay(self, job: dict, pid: int, fd: int) -> None:
        """Pass the child's frames on to the host, enforcing the per-call deadline and the frame format."""
        job_id, limits = job["job_id"], job["limits"]
        m = len(job["calls"])
        reader = channel.FrameReader(job_id, [len(t) for t, _ in job["calls"]], job["causal"], job["last_row"],
                                     host_side=False)
        deadline = time.monotonic() + 2 * limits.seconds_per_call  # module set-up + first call
        failure, start = None, 0  # start: the first call whose frame has not been passed on
        while not reader.done and failure is None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                failure = ("timeout", f"call {reader.next_index} ran longer than {limits.seconds_per_call:g} s")
                break
            if not select.select([fd], [], [], wait)[0]:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            start = reader.next_index
            try:
                events = reader.feed(chunk)
            except channel.ChannelError as e:  # this chunk's frames are not passed on: they fail with it
                failure = ("bad_output", f"malformed result stream: {e}")
                break
            for event in events:
                if event[0] == "call":
                    _, index, status, payload = event
                    self.send(job_id, index, status, payload)
                    deadline = time.monotonic() + limits.seconds_per_call
                elif event[0] == "setup_failed":
                    failure = (event[1], event[2])
            start = reader.next_index
        os.close(fd)
        exit_status, killed = _reap(pid, kill_now=failure is not None or not reader.done)
        if failure is None and not reader.done:  # the child ended (or closed its pipe) before every result
            if killed:
                failure = ("runtime_error", "the program closed its result pipe and did not exit")
            elif os.WIFSIGNALED(exit_status):
                failure = _signal_status(os.WTERMSIG(exit_status))
            else:
                failure = ("runtime_error", "the program's process exited before returning all results")
        if failure is not None:  # one frame per remaining call, then the end: the host's stream stays whole
            return self._fail_from(job_id, start, m, *failure)
        self.send(job_id, channel.END, "ok")


def _reap(pid: int, kill_now: bool) -> tuple[int, bool]:
    """Wait for the child (it should be exiting); kill it if asked to or if it lingers. Returns its wait
    status and whether it was killed here."""
    deadline = time.monotonic() + (0 if kill_now else 0.5)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1], True
        time.sleep(0.0005)


def _signal_status(sig: int) -> tuple[str, str]:
    if sig == signal.SIGXCPU:
        return "timeout", "ran out of CPU time"
    if sig == signal.SIGKILL:
        return "memory", "killed (out of memory or CPU time)"
    if sig == signal.SIGXFSZ:
        return "runtime_error", "tried to write a file"
    try:
        return "runtime_error", f"crashed ({signal.Signals(sig).name})"
    except ValueError:
        return "runtime_error", f"crashed (signal {sig})"


def _child_main(worker: Worker, job: dict, text: bytearray, write_fd: int, used_bytes: int) -> None:
    """Run one program on its calls, one frame per call on RESULT_FD. Never returns."""
    job_id = job["job_id"]

    def send(index, status, payload):
        _write_all(RESULT_FD, channel.encode(job_id, index, status, payload))

    try:
        os.dup2(write_fd, RESULT_FD)
        os.closerange(RESULT_FD + 1, 1 << 16)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        limits = job["limits"]
        for limit, soft, hard in program_rlimits(limits.seconds_per_call, limits.memory_mb, len(job["calls"]),
                                                 used_bytes):
            resource.setrlimit(limit, (soft, hard))
        worker.filter.load()
        warnings.simplefilter("ignore")
        np.seterr(all="ignore")
        filename = job["filename"]
        source = None
        try:
            source = text.decode("utf-8", "surrogatepass")
            code = compile(source, filename, "exec", dont_inherit=True)
        except BaseException as e:
            send(channel.SETUP_FAILED, "syntax_error", f"{filename}: {type(e).__name__}: {e}")
            return
        guards = worker.modules is not None
        namespace = {"__name__": "attnprog_program",
                     "__builtins__": safe_builtins(worker.modules.table) if guards else builtins}
        try:
            exec(code, namespace)
            fn = namespace.get(job["function"])
            if not callable(fn):
                raise ProgramError("rejected", f"{filename}: no function '{job['function']}'")
        except ProgramError as e:
            send(channel.SETUP_FAILED, e.status, str(e))
            return
        except MemoryError:
            send(channel.SETUP_FAILED, "memory", "MemoryError while setting the module up")
            return
        except BaseException as e:
            send(channel.SETUP_FAILED, "runtime_error", describe_exception(e, filename, source))
            return
        tokenizer = worker.tokenizer
        for i, (tokens, text) in enumerate(job["calls"]):
            status, payload = call_program(fn, job["kind"], tokens, text, tokenizer, causal=job["causal"],
                                           last_row=job["last_row"], filename=filename, source=source)
            if status == "ok" and job["causal"] and not job["last_row"]:
                payload = payload[tril_indices(len(tokens))]  # the upper triangle is zero: not sent
            send(i, status, payload)
    except BaseException:
        pass
    finally:
        os._exit(0)


def _load_tokenizer(files: dict) -> ReferenceTokenizer:
    """The model's tokenizer from its files, copied into the jail's private /tmp."""
    folder = "/tmp/tokenizer"
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, os.path.basename(name)), "wb") as f:
            f.write(data)
    from transformers import AutoTokenizer
    return ReferenceTokenizer(AutoTokenizer.from_pretrained(folder))


# Programs cannot use torch; hidden, transformers and thinc skip a 1.5 s import (and its threads).
HIDDEN_PACKAGES = ("torch", "torchgen", "functorch")


def _hide_packages(names) -> None:
    """Make `names` look not installed: not found by `import` nor by importlib.util.find_spec."""
    import importlib.machinery

    class PathFinderWithout(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in names:
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


def serve() -> None:
    """The worker's main loop: set-up, then requests until the host closes stdin."""
    _hide_packages(HIDDEN_PACKAGES)
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        setup = read_message(proto_in)
        for limit, soft, hard in setup["worker_rlimits"]:  # never above what it inherited
            inherited = resource.getrlimit(limit)[1]
            if inherited != resource.RLIM_INFINITY:
                soft, hard = min(soft, inherited), min(hard, inherited)
            resource.setrlimit(limit, (soft, hard))
        worker = Worker(setup, proto_out)
    except BaseException as e:
        _write_all(proto_out, channel.encode(0, channel.SETUP_FAILED, "runtime_error", f"{type(e).__name__}: {e}"))
        return
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # the host stops reading stderr once the worker is up
    os.close(devnull)
    gc.collect()
    gc.freeze()  # keep the warm heap shared with the children
    _write_all(proto_out, channel.encode(0, channel.END, "ok"))
    while True:
        try:
            request = read_message(proto_in)
        except EOFError:
            return
        if request is None:
            return
        job = request[1]
        text = bytearray(job["source_bytes"])
        _read_into(proto_in, text)
        worker.run(job, text)


if __name__ == "__main__":
    sys.exit(serve())
