"""The host side: a pool of warm workers in jails, jobs handed out and results read back.

`Sandbox.run_many(jobs)` lints each job's program (validation.py), then hands the jobs to idle workers and
reads their frames in one select loop. Whatever a worker sends is parsed by channel.FrameReader and
checked again here (sizes, order, normalised matrices); a worker that breaks the format, dies, or stops
answering is killed (its whole jail) and replaced, and only the job it was running fails. A run's
result always has one entry per call: a matrix, or None with the reason.
"""
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..programs import ProgramError
from . import channel
from .jail import (WORKER_ADDRESS_SPACE, JailError, compiled, jail_command, jail_python_path, program_filter,
                   worker_rlimits, write_worker_filter)
from .policy import MAX_ERROR_BYTES, MAX_TOKENS, Limits, Policy
from .server import _write_all, write_message
from .validation import check_program, program_text, unchecked_program

# The tokenizer's own files are copied into the jail (its folder, which may hold model weights, is not bound).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "config.json")
STARTUP_SECONDS = 120       # a worker that is not ready by then is broken
QUIET_SECONDS = 120         # longest a busy worker may go without sending a frame, on top of the call limit
STDERR_KEPT = 4000


@dataclass
class Job:
    """One program called on a batch of examples. `calls` holds (tokens, text) pairs; the program's output
    for a call must be len(tokens) x len(tokens). With `last_row`, only the output's last row comes back."""
    source: str
    filename: str
    function: str
    kind: str                       # "tokens": f(tokens) | "reference": f(sentence, tokenizer) -> (label, matrix)
    calls: list
    causal: bool = True
    last_row: bool = False


@dataclass
class JobResult:
    status: str                     # "ok" or the first failure
    error: str | None
    outputs: list = field(default_factory=list)       # per call: normalised float32 matrix (or row), or None
    call_status: list = field(default_factory=list)   # per call: a contracts.PROGRAM_STATUSES entry
    call_errors: list = field(default_factory=list)   # per call: message or None

    @classmethod
    def failed(cls, m: int, status: str, error: str) -> "JobResult":
        return cls(status, error, [None] * m, [status] * m, [error] * m)

    def finish(self) -> "JobResult":
        for status, error in zip(self.call_status, self.call_errors):
            if status != "ok":
                self.status, self.error = status, error
                break
        return self


def _tokenizer_files(tokenizer_dir) -> dict:
    if not tokenizer_dir:
        return {}
    folder = Path(tokenizer_dir)
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    if not files:
        raise FileNotFoundError(f"sandbox: no tokenizer files in {folder}")
    return files


# The worker's command line: sys.path (host folders) comes on stdin, so argv names none of it.
BOOTSTRAP = ("import os, sys; n = int.from_bytes(os.read(0, 4), 'little'); "
             "sys.path[:0] = os.read(0, n).decode().split('\\0'); "
             "from attnprog.sandbox.server import serve; serve()")


class _Worker:
    """One warm worker process in its own jail, and its pipes."""

    def __init__(self, setup: dict):
        argv = [str(Path(sys.executable).resolve()), "-I", "-S", "-B", "-c", BOOTSTRAP]
        seccomp_fd = write_worker_filter()
        args_fd, args_write = os.pipe()
        try:
            command, args, self.stage = jail_command(argv, seccomp_fd, args_fd)
            # cwd "/": the jail's pid 1 keeps the directory it started in, which /proc/1/cwd would show
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, pass_fds=[seccomp_fd, args_fd],
                                         start_new_session=True, cwd="/",
                                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            os.close(args_fd)
            with os.fdopen(args_write, "wb") as out:
                args_write = None
                out.write(args)
        finally:
            os.close(seccomp_fd)
            for fd in (args_fd, args_write):
                try:
                    if fd is not None:
                        os.close(fd)
                except OSError:
                    pass
        self.out = self.proc.stdout.fileno()
        self.err = self.proc.stderr.fileno()
        self.stderr_tail = b""
        path = "\0".join(jail_python_path()).encode()
        _write_all(self.proc.stdin.fileno(), len(path).to_bytes(4, "little") + path)
        write_message(self.proc.stdin.fileno(), setup)

    def drain_stderr(self) -> None:
        data = os.read(self.err, 1 << 16)
        self.stderr_tail = (self.stderr_tail + data)[-STDERR_KEPT:]
        if not data:  # closed: stop watching it
            self.err = None

    def wait_ready(self) -> None:
        """Wait for the worker's first frame: ready, or why it could not start."""
        deadline = time.monotonic() + STARTUP_SECONDS
        buffer = b""
        while True:
            if len(buffer) >= channel.HEADER.size:
                _, index, _, nbytes = channel.HEADER.unpack_from(buffer)
                if index == channel.END and nbytes == 0:
                    self._remove_stage()  # bwrap has bound what it needed; nothing is left behind on the host
                    return
                if index != channel.SETUP_FAILED or not 0 <= nbytes <= MAX_ERROR_BYTES:
                    self.kill()
                    raise JailError("sandbox: the worker sent a malformed first frame")
                if len(buffer) >= channel.HEADER.size + nbytes:
                    self.kill()
                    message = buffer[channel.HEADER.size:channel.HEADER.size + nbytes]
                    raise JailError("sandbox: the worker could not start: " + message.decode("utf-8", "replace"))
            wait = deadline - time.monotonic()
            fds = [self.out] + ([self.err] if self.err is not None else [])
            ready = select.select(fds, [], [], wait)[0] if wait > 0 else []
            if not ready:
                self.kill()
                raise JailError(f"sandbox: the worker did not start within {STARTUP_SECONDS} s")
            if self.err in ready:
                self.drain_stderr()
            if self.out in ready:
                data = os.read(self.out, 1 << 16)
                if not data:
                    self.kill()
                    raise JailError("sandbox: the jail could not start: " +
                                    self.stderr_tail.decode("utf-8", "replace").strip())
                buffer += data

    def send_job(self, job: Job, job_id: int, checked, limits: Limits) -> None:
        """The job, then its program's text as raw bytes (the worker keeps no source: server.py)."""
        text = program_text(job.source, checked).encode("utf-8", "surrogatepass")
        write_message(self.proc.stdin.fileno(), ("job", {
            "job_id": job_id, "source_bytes": len(text), "filename": job.filename, "function": job.function,
            "kind": job.kind, "calls": job.calls, "causal": job.causal, "last_row": job.last_row,
            "imports": checked.imports, "linguistic": checked.linguistic, "limits": limits}))
        _write_all(self.proc.stdin.fileno(), text)

    def host_pids(self) -> list[int]:
        """The host pids of this jail's processes (bwrap, its init, the worker, a running child)."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return pids

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap leads its own session; --die-with-parent does the rest
        except OSError:
            pass
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        self._remove_stage()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                write_message(self.proc.stdin.fileno(), None)
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _remove_stage(self) -> None:
        if self.stage:
            try:
                os.rmdir(self.stage)
            except OSError:
                pass
            self.stage = None


@dataclass
class _Running:
    index: int
    job: Job
    reader: channel.FrameReader
    result: JobResult
    deadline: float
    quiet: float


class Sandbox:
    """A pool of warm workers, each in its own jail. `run_many(jobs)` runs jobs in parallel, one per worker.
    With `tokenizer_dir`, the workers load that Hugging Face tokenizer once (reference programs need it)."""

    def __init__(self, tokenizer_dir=None, workers: int | None = None, policy: Policy = Policy()):
        self.tokenizer_dir = str(tokenizer_dir) if tokenizer_dir else None
        self.policy = policy
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._setup = {"policy": policy, "tokenizer_files": _tokenizer_files(tokenizer_dir),
                       "program_filter": compiled(program_filter()),
                       "worker_rlimits": worker_rlimits(own_uid=os.geteuid() == 0)}
        self._lock = threading.Lock()
        self._next_job_id = 1
        self._pool: list = []
        try:
            self._pool = [_Worker(self._setup) for _ in range(self.workers)]
            for worker in self._pool:
                worker.wait_ready()
        except BaseException:
            self.close()
            raise
        self._closed = False

    # -- running ------------------------------------------------------------------------------------------

    def run(self, job: Job, limits: Limits = Limits()) -> JobResult:
        return self.run_many([job], limits)[0]

    def run_many(self, jobs: list, limits: Limits = Limits()) -> list:
        if (limits.memory_mb << 20) > WORKER_ADDRESS_SPACE // 2:
            raise ValueError(f"sandbox: memory_mb {limits.memory_mb} is more than a worker allows a program "
                             f"({WORKER_ADDRESS_SPACE // 2 >> 20} MB)")
        results: list = [None] * len(jobs)
        todo = deque()
        for i, job in enumerate(jobs):
            too_long = [len(tokens) for tokens, _ in job.calls if len(tokens) > MAX_TOKENS]
            if too_long:
                raise ValueError(f"sandbox: examples longer than {MAX_TOKENS} tokens ({too_long[0]})")
            try:
                checked = check_program(job.source, job.filename, job.function, self.policy.allowed_imports) \
                    if self.policy.python_guards else unchecked_program(job.source, job.filename, job.function)
            except ProgramError as e:
                results[i] = JobResult.failed(len(job.calls), e.status, str(e))
                continue
            if not job.calls:
                results[i] = JobResult("ok", None)
                continue
            todo.append((i, job, checked))
        with self._lock:
            self._loop(todo, results, limits)
        return results

    def _loop(self, todo: deque, results: list, limits: Limits) -> None:
        running: dict = {}  # worker -> _Running
        quiet = QUIET_SECONDS + 2 * limits.seconds_per_call
        while todo or running:
            for worker in [w for w in self._pool if w not in running]:
                if not todo:
                    break
                i, job, checked = todo.popleft()
                job_id = self._next_job_id
                self._next_job_id += 1
                m = len(job.calls)
                try:
                    worker.send_job(job, job_id, checked, limits)
                except OSError:  # the worker died while idle: replace it, then retry the job
                    self._replace(worker)
                    todo.appendleft((i, job, checked))
                    continue
                reader = channel.FrameReader(job_id, [len(t) for t, _ in job.calls], job.causal, job.last_row,
                                             host_side=True)
                result = JobResult("ok", None, [None] * m, ["runtime_error"] * m, [None] * m)
                running[worker] = _Running(i, job, reader, result, time.monotonic() + quiet, quiet)
            if not running:
                continue
            fds = {}
            for worker in running:
                fds[worker.out] = (worker, "out")
            for worker in self._pool:
                if worker.err is not None:
                    fds[worker.err] = (worker, "err")
            wait = min(r.deadline for r in running.values()) - time.monotonic()
            ready = select.select(list(fds), [], [], max(wait, 0))[0]
            now = time.monotonic()
            for fd in ready:
                worker, stream = fds[fd]
                if stream == "err":
                    worker.drain_stderr()
                    continue
                run = running[worker]
                problem = None
                data = os.read(fd, 1 << 20)
                if not data:
                    problem = ("runtime_error", "the sandbox worker died while running this program")
                else:
                    try:
                        events = run.reader.feed(data)
                    except channel.ChannelError as e:
                        problem = ("bad_output", f"malformed result stream from the sandbox: {e}")
                        events = []
                    run.deadline = now + run.quiet
                    for event in events:
                        if event[0] == "call":
                            self._store(run, *event[1:])
                if problem or run.reader.done:
                    self._finish(run, results, problem)
                    del running[worker]
                    if problem:
                        self._replace(worker)
            for worker, run in list(running.items()):
                if time.monotonic() > run.deadline:
                    self._finish(run, results, ("timeout", "the sandbox worker stopped answering"))
                    del running[worker]
                    self._replace(worker)

    @staticmethod
    def _store(run: _Running, index: int, status: str, payload: bytes) -> None:
        tokens = run.job.calls[index][0]
        if status == "ok":
            matrix = channel.decode_matrix(payload, len(tokens), run.job.causal, run.job.last_row)
            if matrix is None:
                run.result.call_status[index], run.result.call_errors[index] = "bad_output", "not a normalised matrix"
            else:
                run.result.outputs[index], run.result.call_status[index] = matrix, "ok"
        else:
            run.result.call_status[index] = status
            run.result.call_errors[index] = payload.decode("utf-8", "replace")

    @staticmethod
    def _finish(run: _Running, results: list, problem) -> None:
        for i in range(run.reader.next_index, len(run.job.calls)):
            run.result.call_status[i], run.result.call_errors[i] = problem or ("runtime_error", "no result")
            run.result.outputs[i] = None
        results[run.index] = run.result.finish()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        fresh = _Worker(self._setup)
        fresh.wait_ready()
        self._pool[self._pool.index(worker)] = fresh

    # -- the jails, seen from outside ----------------------------------------------------------------------

    def host_pids(self) -> list[int]:
        """Host pids of every process in the pool's jails (tests look at them from outside)."""
        return [pid for worker in self._pool for pid in worker.host_pids()]

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for worker in self._pool:
            worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_shared: dict = {}
_shared_lock = threading.Lock()


def shared_sandbox(tokenizer_dir=None) -> Sandbox:
    """One Sandbox per tokenizer folder for the whole process, started on first use, closed at exit."""
    key = str(tokenizer_dir) if tokenizer_dir else None
    with _shared_lock:
        if key not in _shared:
            if not _shared:
                import atexit
                atexit.register(close_shared_sandboxes)
            _shared[key] = Sandbox(key)
        return _shared[key]


def close_shared_sandboxes() -> None:
    with _shared_lock:
        for sandbox in _shared.values():
            sandbox.close()
        _shared.clear()
