"""Validate untrusted program code, then run it in an isolated, resource-limited process.

Code that did not come from the project itself (LLM output, user files) goes through these layers; each
stops attacks on its own, and tests/test_sandbox.py turns the upper ones off to prove the lower ones hold:

1. `validate_source` reads the code without running it: imports only from a whitelist, no dunder or
   private attributes, no frame/code internals, no `str.format` attribute walks, no file I/O helpers, no
   eval/exec/open/getattr/... A program that fails is `rejected` (or `syntax_error`) and never runs.
2. It runs in a child forked from a pre-warmed server process (numpy, the helpers and the tokenizer are
   already loaded, so a fork costs a few ms). The server's environment is scrubbed (no API keys), the child
   closes every inherited file descriptor, works in an empty folder, gets builtins without
   eval/open/getattr/..., and an import function that hands out read-only views of whitelisted modules
   (public functions and classes, no other modules hanging off them).
3. An audit hook (`sys.addaudithook`) in the child refuses everything but reading the tokenizer folder:
   opening files for writing or outside that folder, sockets, subprocesses, fork/exec, signals, ctypes,
   new imports, exec/compile, frame access. Audit hooks cannot be removed once added.
4. A seccomp filter (where libseccomp is installed) makes the kernel refuse the system calls behind all
   that: opening any file, new processes, exec, signals to other processes, sockets, changing files,
   raising limits. It holds for root, for native code (the tokenizer's Rust core, memory-unsafe numpy
   calls) and for code that found a way around the layers above.
5. Resource limits in the child: CPU time, address space, file size 0 (no bytes written even by root), no
   new processes or descriptors, no core dumps; the server kills a child that misses a per-call deadline.
6. The server reads the child's results as fixed-size frames and drops any that are out of order, the wrong
   size, or not normalised matrices. A program can only spoil its own results.

The server never runs program code itself, and a fresh child serves each program run, so one program's
state never reaches another's. Only Linux is supported (fork, /proc, audit hooks).
"""
import ast
import errno
import functools
import math
import os
import pickle
import queue
import resource
import select
import signal
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .contracts import PROGRAM_STATUSES
from .matrices import tril_indices
from .programs import ProgramError, call_program, describe_exception

# Modules a program may import. Each is handed out as a view (see `_module_view`).
ALLOWED_IMPORTS = ("numpy", "math", "re", "collections", "itertools", "functools", "typing", "__future__",
                   "attnprog.helpers", "transformers")
# Submodules reachable inside the numpy view; any other submodule (numpy.ma, numpy.testing, ...) is left out.
ALLOWED_SUBMODULES = ("numpy.linalg", "numpy.fft", "numpy.random", "numpy.lib", "numpy.lib.stride_tricks")
# Reference programs import tokenizer classes from transformers for type annotations only; they get stand-ins.
TRANSFORMERS_STUB_NAMES = ("PreTrainedTokenizerBase", "PreTrainedTokenizer", "PreTrainedTokenizerFast",
                           "AutoTokenizer")

DENIED_NAMES = frozenset({
    "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals", "vars", "dir",
    "__import__", "breakpoint", "input", "help", "exit", "quit", "memoryview", "copyright", "credits",
    "license"})
DENIED_ATTRIBUTES = DENIED_NAMES | frozenset({
    # modules that hang off allowed ones (tests/test_sandbox.py walks every allowed module to keep this complete)
    "builtins", "sys", "os", "subprocess", "inspect", "operator", "types", "warnings", "contextlib",
    "copyreg", "enum", "abc", "textwrap", "string", "ctypes", "ctypeslib", "f2py", "testing", "distutils",
    "importlib", "pickle", "io", "socket", "shutil", "unicodedata", "mtrand", "bit_generator", "npyio",
    # frames and code objects lead back to the runner's globals
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
    "ag_await", "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "f_trace", "tb_frame", "tb_next",
    # format strings look attributes up by name; `.format` on a literal is checked separately
    "format_map", "vformat", "get_field", "Formatter",
    # file I/O
    "load", "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt", "fromfile", "tofile",
    "dump", "dumps", "memmap", "open_memmap", "DataSource", "fromregex",
    # reads and writes memory outside the array (sliding_window_view is the checked alternative)
    "as_strided"})
MAX_SOURCE_CHARS = 100_000
MAX_TOKENS = 4096          # longest token list a sandboxed program is called on
MAX_ERROR_BYTES = 2000     # longest error message a child may send

STATUSES = PROGRAM_STATUSES  # the frame codes: index into this tuple


@dataclass(frozen=True)
class Limits:
    """What one sandboxed program run may use. A run is one program called on a batch of examples."""
    seconds_per_call: float = 2.0   # wall clock per call of the program (setting the module up counts as one)
    memory_mb: int = 1024           # address space the program may add to the pre-warmed process


@dataclass(frozen=True)
class Policy:
    """Which protection layers are on. The workflow always uses the default (everything on); tests switch
    single layers off to prove that the layers below still stop an attack."""
    validate: bool = True
    audit: bool = True
    seccomp: bool = True          # used where libseccomp is installed (`Sandbox.seccomp` says if it is)
    allowed_imports: tuple = ALLOWED_IMPORTS


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
    call_status: list = field(default_factory=list)   # per call: a STATUSES entry
    call_errors: list = field(default_factory=list)   # per call: message or None


# ---------------------------------------------------------------------------------------------------------
# Layer 1: static validation


def _importable(allowed_imports) -> set:
    """Every module name an import statement may name: the whitelist, numpy's allowed submodules, and the
    parent packages of dotted names (`import attnprog.helpers` binds `attnprog`, a stand-in holding only
    `helpers`)."""
    names = set(allowed_imports)
    if "numpy" in names:
        names.update(ALLOWED_SUBMODULES)
    for name in list(names):
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


def _format_fields(fmt: str):
    """The field names of a format string, including fields nested in format specs."""
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is not None:
            yield name
        if spec:
            yield from _format_fields(spec)


def _check_format_literal(node: ast.Call) -> str | None:
    """`"...".format(...)` is fine when the literal's fields only name arguments (no `.attr`, no `[key]`)."""
    literal = node.func.value
    if not (isinstance(literal, ast.Constant) and isinstance(literal.value, str)):
        return "'.format' is only allowed on a string literal"
    try:
        fields = list(_format_fields(literal.value))
    except ValueError as e:
        return f"bad format string: {e}"
    if any("." in f or "[" in f for f in fields):
        return "format fields may not look up attributes or items"
    return None


def validate_source(source: str, filename: str = "<program>", allowed_imports=ALLOWED_IMPORTS) -> ast.Module:
    """Parse `source` and check it against the sandbox rules without running it; returns the AST.
    Raises ProgramError("syntax_error" | "rejected", "<file>:<line>: <what>")."""
    if len(source) > MAX_SOURCE_CHARS:
        raise ProgramError("rejected", f"{filename}: program is longer than {MAX_SOURCE_CHARS} characters")
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise ProgramError("syntax_error", f"{filename}:{e.lineno}: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        raise ProgramError("syntax_error", f"{filename}: cannot parse ({type(e).__name__})") from None

    def reject(node, what):
        raise ProgramError("rejected", f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    def check_attr(node, attr):
        if attr.startswith("_"):
            reject(node, f"attribute '{attr}' is not allowed (no private or dunder attributes)")
        if attr in DENIED_ATTRIBUTES:
            reject(node, f"attribute '{attr}' is not allowed")

    importable = _importable(allowed_imports)
    packages_only = importable - set(allowed_imports) - set(ALLOWED_SUBMODULES)  # `attnprog`: only `helpers`
    allowed_text = ", ".join(allowed_imports)
    checked_format_calls = set()  # the `.format` attributes of calls on a checked string literal
    for node in ast.walk(tree):  # breadth first: a call comes before its `func`
        for field in ("name", "asname", "arg"):  # binding `__builtins__` would swap the builtins
            if getattr(node, field, None) == "__builtins__":
                reject(node, "the name '__builtins__' is not allowed")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in importable:
                    reject(node, f"import of '{alias.name}' is not allowed (allowed: {allowed_text})")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                reject(node, "relative imports are not allowed")
            if node.module not in importable:
                reject(node, f"import from '{node.module}' is not allowed (allowed: {allowed_text})")
            for alias in node.names:
                if node.module == "__future__" or alias.name == "*":
                    continue
                check_attr(node, alias.name)
                if node.module in packages_only and f"{node.module}.{alias.name}" not in importable:
                    reject(node, f"import of '{node.module}.{alias.name}' is not allowed (allowed: {allowed_text})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            problem = _check_format_literal(node)
            if problem:
                reject(node, problem)
            checked_format_calls.add(id(node.func))
        elif isinstance(node, ast.Attribute):
            if node.attr == "format":
                if id(node) not in checked_format_calls:
                    reject(node, "'.format' is only allowed as a call on a string literal")
            else:
                check_attr(node, node.attr)
        elif isinstance(node, ast.Name):
            if node.id in DENIED_NAMES:
                reject(node, f"name '{node.id}' is not allowed")
            if node.id.startswith("__") and node.id != "__name__":
                reject(node, f"name '{node.id}' is not allowed")
        elif isinstance(node, ast.MatchClass):
            for attr in node.kwd_attrs:
                check_attr(node, attr)
    return tree


# ---------------------------------------------------------------------------------------------------------
# Layer 2: what the program sees (restricted builtins, module views)


def _module_view(module: types.ModuleType, views: dict) -> types.ModuleType:
    """A copy of `module`'s public namespace without the modules that hang off it (allowed submodules stay,
    as views themselves). Assigning to a view never changes the real module."""
    if module.__name__ in views:
        return views[module.__name__]
    view = types.ModuleType(module.__name__, getattr(module, "__doc__", None))
    views[module.__name__] = view
    for name in dir(module):
        if name.startswith("_") or name in DENIED_ATTRIBUTES:
            continue
        try:
            with warnings.catch_warnings():  # deprecated aliases (typing.re) warn when touched
                warnings.simplefilter("ignore")
                value = getattr(module, name)
        except Exception:  # lazy attributes that fail to load
            continue
        if isinstance(value, types.ModuleType):
            if value.__name__ in ALLOWED_SUBMODULES:
                setattr(view, name, _module_view(value, views))
            continue
        setattr(view, name, value)
    return view


def _transformers_stub() -> types.ModuleType:
    stub = types.ModuleType("transformers", "Stand-ins for tokenizer classes (type annotations only).")
    for name in TRANSFORMERS_STUB_NAMES:
        setattr(stub, name, type(name, (), {}))
    return stub


def module_table(allowed_imports=ALLOWED_IMPORTS) -> dict:
    """{import name: module view} for everything a program may import; the server builds it before any fork.
    A whitelisted module that is not installed (spaCy) or not written yet is left out: importing it fails."""
    views: dict = {}
    table = {}
    for name in sorted(_importable(allowed_imports)):
        if name == "transformers":
            table[name] = _transformers_stub()
            continue
        try:
            __import__(name)
        except ImportError:
            continue
        table[name] = _module_view(sys.modules[name], views)
    for name in sorted(table, key=len, reverse=True):  # parents of dotted names that are not views already
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent not in table:
                table[parent] = types.ModuleType(parent)
            if not hasattr(table[parent], parts[i]):
                setattr(table[parent], parts[i], table[".".join(parts[:i + 1])])
    return table


def _restricted_import(table: dict):
    def restricted_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            raise ImportError("relative imports are not allowed")
        if name in table:
            return table[name] if fromlist else table[name.split(".")[0]]
        # numpy's C code imports its own submodules lazily (ndarray.mean -> numpy._core._methods) with
        # PyImport_Import, which calls the running frame's __import__ but then takes the module from
        # sys.modules itself. Let those through when numpy has loaded the module, without handing it out.
        if name.startswith("numpy.") and name in sys.modules:
            return None
        raise ImportError(f"import of '{name}' is not allowed in the sandbox")
    return restricted_import


def safe_builtins(table: dict) -> dict:
    import builtins
    allowed = {k: v for k, v in vars(builtins).items() if k not in DENIED_NAMES and not k.startswith("_")}
    allowed["__build_class__"] = builtins.__build_class__  # the `class` statement needs it
    allowed["__import__"] = _restricted_import(table)
    return allowed


class ReferenceTokenizer:
    """The model's tokenizer as reference programs see it: calling it and the usual lookups, nothing that
    reaches files or the Rust tokenizer behind it. `return_tensors="pt"` gives numpy arrays, since torch is
    not loaded in the sandbox (`.input_ids[0]`, `len`, `.tolist()` behave the same)."""
    METHODS = frozenset({"encode", "decode", "batch_decode", "tokenize", "convert_ids_to_tokens",
                         "convert_tokens_to_ids", "convert_tokens_to_string", "get_vocab", "encode_plus",
                         "batch_encode_plus"})
    ATTRIBUTES = frozenset({"vocab_size", "model_max_length", "padding_side", "all_special_tokens",
                            "all_special_ids"} |
                           {f"{kind}_token{suffix}" for kind in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
                            for suffix in ("", "_id")})

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        if kwargs.get("return_tensors") == "pt":
            kwargs["return_tensors"] = "np"
        return self._tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        if name in self.METHODS or name in self.ATTRIBUTES:
            return getattr(self._tokenizer, name)
        raise AttributeError(f"the sandbox's tokenizer has no attribute '{name}'")


def load_reference_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return ReferenceTokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)))


# ---------------------------------------------------------------------------------------------------------
# Layers 3 and 4: the child process


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _audit_hook(module_code, read_dirs, trusted_section):
    """Refuse every audited event except reading under `read_dirs`, running the program's own module code,
    `id()`, `sys._getframe` (typing needs it; the frames only lead to code whose dangerous calls are audited
    too), and reading frame internals while the runner itself formats an error (`trusted_section[0]`)."""
    read_dirs = tuple(os.path.join(os.path.realpath(d), "") for d in read_dirs)

    def hook(event, args):
        if event in ("builtins.id", "sys._getframe"):
            return
        if event == "exec" and args and args[0] is module_code:
            return
        if event == "object.__getattr__" and trusted_section[0]:
            return
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            read_only = (mode is None or not any(c in str(mode) for c in "wax+")) and not (flags or 0) & _WRITE_FLAGS
            if read_only and isinstance(path, str) and read_dirs and \
                    os.path.realpath(path).startswith(read_dirs):
                return
        raise PermissionError(f"sandbox: '{event}' is not allowed")
    return hook


# System calls a running program never needs: opening any file, new processes, signals to others, network,
# changes to files or privileges. Denied with EPERM by a seccomp filter, which holds even for root and for
# code that gets around everything above: raw `_posixsubprocess.fork_exec`, the tokenizer's Rust code
# reading or writing files, or native code reached through memory-unsafe numpy calls (`ndarray(buffer=...,
# strides=...)`). Everything the child needs from files was loaded before the fork.
_DENIED_SYSCALLS = (
    "open", "openat", "openat2", "creat", "open_by_handle_at", "name_to_handle_at",
    "fork", "vfork", "clone", "clone3", "execve", "execveat",
    "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal",
    "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev",
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "mknod", "mknodat", "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "rename",
    "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
    "chown", "fchown", "lchown", "fchownat", "truncate", "ftruncate", "utime", "utimes", "utimensat",
    "futimesat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "setrlimit", "prlimit64", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setfsuid", "setfsgid", "setgroups", "capset", "unshare", "setns", "mount", "umount2", "pivot_root",
    "chroot", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "init_module", "finit_module",
    "delete_module", "kexec_load", "reboot", "swapon", "swapoff", "sethostname", "setdomainname", "iopl",
    "ioperm", "personality", "userfaultfd", "io_uring_setup")


def build_syscall_filter():
    """The seccomp filter the children load (built once in the server), or None where libseccomp is missing
    or the system does not let a process load one."""
    try:
        import pyseccomp as seccomp
        syscall_filter = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    except Exception:  # no libseccomp.so.2 on this system
        return None
    for name in _DENIED_SYSCALLS:
        try:
            syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except Exception:  # not a system call on this architecture (open, fork on arm64)
            pass
    # Some kernels and container runtimes refuse seccomp filters: try loading it in a throwaway child.
    pid = os.fork()
    if pid == 0:
        try:
            syscall_filter.load()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return syscall_filter if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else None


RESULT_FD = 3
_FRAME = struct.Struct("<iiq")  # call index (-1: module set-up), status code, payload bytes


def _send_frame(index: int, status: str, payload) -> None:
    if isinstance(payload, np.ndarray):
        data = np.ascontiguousarray(payload, dtype=np.float32).tobytes()
    else:
        data = str(payload).encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    message = _FRAME.pack(index, STATUSES.index(status), len(data)) + data
    view = memoryview(message)
    while view:
        view = view[os.write(RESULT_FD, view):]


def _isolate(result_fd: int, workdir: str, limits: Limits, n_calls: int) -> None:
    """Cut the child off from everything the server holds, then cap what it may use."""
    os.dup2(result_fd, RESULT_FD)
    os.closerange(RESULT_FD + 1, 1 << 16)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir(workdir)
    os.setpgid(0, 0)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cpu = math.ceil(limits.seconds_per_call * (n_calls + 2)) + 1
    memory = used + limits.memory_mb * 2 ** 20
    for limit, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
                              (resource.RLIMIT_AS, memory, memory),
                              (resource.RLIMIT_FSIZE, 0, 0),
                              (resource.RLIMIT_NPROC, 0, 0),  # not enforced for root; the audit hook covers fork
                              (resource.RLIMIT_NOFILE, RESULT_FD + 5, RESULT_FD + 5),
                              (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(limit, (soft, hard))


def _child_main(job: Job, result_fd: int, workdir: str, limits: Limits, policy: Policy, table: dict,
                tokenizer, read_dirs, syscall_filter) -> None:
    """Run one job in a freshly forked child and write one frame per call to RESULT_FD. Never returns."""
    try:
        _isolate(result_fd, workdir, limits, len(job.calls))
        if syscall_filter is not None:
            syscall_filter.load()
        warnings.simplefilter("ignore")
        np.seterr(all="ignore")
        try:
            code = compile(job.source, job.filename, "exec")
        except Exception as e:
            _send_frame(-1, "syntax_error", f"{job.filename}: {type(e).__name__}: {e}")
            return
        namespace = {"__name__": "attnprog_program", "__builtins__": safe_builtins(table)}
        trusted_section = [False]
        if policy.audit:
            sys.addaudithook(_audit_hook(code, read_dirs, trusted_section))
        try:
            exec(code, namespace)
            fn = namespace.get(job.function)
            if not callable(fn):
                raise ProgramError("rejected", f"{job.filename}: no function '{job.function}'")
        except ProgramError as e:
            _send_frame(-1, e.status, str(e))
            return
        except MemoryError:
            _send_frame(-1, "memory", "MemoryError while setting the module up")
            return
        except BaseException as e:
            _send_frame(-1, "runtime_error", describe_exception(e, job.filename, job.source, trusted_section))
            return
        for i, (tokens, text) in enumerate(job.calls):
            status, payload = call_program(fn, job.kind, tokens, text, tokenizer, causal=job.causal,
                                           last_row=job.last_row, filename=job.filename, source=job.source,
                                           trusted_section=trusted_section)
            if status == "ok" and job.causal and not job.last_row:
                payload = payload[tril_indices(len(tokens))]  # the upper triangle is zero: not sent
            _send_frame(i, status, payload)
    except BaseException:
        pass
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------------------------------------
# The server: a pre-warmed process that forks one child per job and checks what comes back


def _payload_size(n: int, causal: bool, last_row: bool) -> int:
    return 4 * (n if last_row else n * (n + 1) // 2 if causal else n * n)


@functools.lru_cache(maxsize=None)
def _row_starts(n: int) -> np.ndarray:
    return np.cumsum(np.arange(n)) if n else np.zeros(0, dtype=int)  # row i starts at i(i+1)/2


def _unpack_matrix(data: bytes, n: int, causal: bool, last_row: bool) -> np.ndarray | None:
    """The matrix (or row) a child sent, or None unless every row is a distribution (non-negative, finite,
    summing to 1): what `matrices.normalise` makes, so nothing else gets through."""
    values = np.frombuffer(data, dtype=np.float32)
    if n and not (np.isfinite(values).all() and values.min() >= 0):
        return None
    if last_row:
        sums = values.sum(keepdims=True, dtype=np.float64)
    elif causal:
        sums = np.add.reduceat(values, _row_starts(n), dtype=np.float64) if n else values
    else:
        sums = values.reshape(n, n).sum(axis=1, dtype=np.float64)
    if n and np.abs(sums - 1).max() > 1e-3:
        return None
    if last_row:
        return values.copy()
    if causal:
        out = np.zeros((n, n), dtype=np.float32)
        out[tril_indices(n)] = values
        return out
    return values.reshape(n, n).copy()


def _signal_status(sig: int) -> tuple[str, str]:
    if sig == signal.SIGXCPU:
        return "timeout", "ran out of CPU time"
    if sig == signal.SIGKILL:
        return "memory", "killed (out of memory)"
    if sig == signal.SIGXFSZ:
        return "runtime_error", "tried to write a file"
    return "runtime_error", f"crashed ({signal.Signals(sig).name})"


def _collect(pid: int, fd: int, job: Job, limits: Limits) -> JobResult:
    """Read the child's frames, enforcing the per-call deadline and the frame format; reap the child."""
    m = len(job.calls)
    sizes = [len(tokens) for tokens, _ in job.calls]
    result = JobResult("ok", None, [None] * m, ["timeout"] * m, [None] * m)
    buf = bytearray()
    index = 0
    deadline = time.monotonic() + 2 * limits.seconds_per_call  # module set-up + first call
    failure = None  # (status, message) that ends the run early
    while index < m and failure is None:
        wait = deadline - time.monotonic()
        if wait <= 0:
            failure = ("timeout", f"call {index} ran longer than {limits.seconds_per_call:g} s")
            break
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= _FRAME.size and index < m:
            frame_index, code, nbytes = _FRAME.unpack_from(buf)
            if code < 0 or code >= len(STATUSES) or frame_index not in (index, -1) or nbytes < 0:
                failure = ("bad_output", "malformed result stream")
                break
            status = STATUSES[code]
            expected = _payload_size(sizes[index], job.causal, job.last_row) if status == "ok" else None
            if (expected is not None and nbytes != expected) or (expected is None and nbytes > MAX_ERROR_BYTES):
                failure = ("bad_output", f"result for call {index} has the wrong size")
                break
            if len(buf) < _FRAME.size + nbytes:
                break
            data = bytes(buf[_FRAME.size:_FRAME.size + nbytes])
            del buf[:_FRAME.size + nbytes]
            if frame_index == -1:
                failure = (status, data.decode("utf-8", "replace"))
                break
            if status == "ok":
                matrix = _unpack_matrix(data, sizes[index], job.causal, job.last_row)
                if matrix is None:
                    result.call_status[index], result.call_errors[index] = "bad_output", "not a normalised matrix"
                else:
                    result.outputs[index], result.call_status[index] = matrix, "ok"
            else:
                result.call_status[index] = status
                result.call_errors[index] = data.decode("utf-8", "replace")
            index += 1
            deadline = time.monotonic() + limits.seconds_per_call
    os.close(fd)
    exit_status, killed = _reap(pid, kill_now=failure is not None)
    if failure is None and index < m:  # the child ended (or closed its pipe) before sending every result
        if killed:
            failure = ("runtime_error", "the program closed its result pipe and did not exit")
        elif os.WIFSIGNALED(exit_status):
            failure = _signal_status(os.WTERMSIG(exit_status))
        else:
            failure = ("runtime_error", "the program's process exited before returning all results")
    if failure is not None:
        for i in range(index, m):
            result.call_status[i], result.call_errors[i] = failure
    for status, error in zip(result.call_status, result.call_errors):
        if status != "ok":
            result.status, result.error = status, error
            break
    return result


def _reap(pid: int, kill_now: bool) -> tuple[int, bool]:
    """Wait for the child to exit (it should be exiting: every result is in or its pipe is closed); kill it
    if asked to or if it lingers. Returns its wait status and whether this function killed it."""
    deadline = time.monotonic() + (0 if kill_now else 0.5)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        if time.monotonic() >= deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:  # not its own group leader yet
                os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1], True
        time.sleep(0.0005)


def _run_job(job: Job, limits: Limits, policy: Policy, table: dict, tokenizer, read_dirs, workdir,
             syscall_filter) -> JobResult:
    if policy.validate:
        try:
            validate_source(job.source, job.filename, policy.allowed_imports)
        except ProgramError as e:
            m = len(job.calls)
            return JobResult(e.status, str(e), [None] * m, [e.status] * m, [str(e)] * m)
    too_long = [len(tokens) for tokens, _ in job.calls if len(tokens) > MAX_TOKENS]
    if too_long:
        raise ValueError(f"sandbox: examples longer than {MAX_TOKENS} tokens ({too_long[0]})")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_main(job, write_fd, workdir, limits, policy, table, tokenizer, read_dirs, syscall_filter)
    os.close(write_fd)
    return _collect(pid, read_fd, job, limits)


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 22))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _write_message(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack("<q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_message(fd: int):
    (n,) = struct.unpack("<q", _read_exact(fd, 8))
    return pickle.loads(_read_exact(fd, n))


def serve() -> None:
    """The sandbox server's main loop (started by `Sandbox`): jobs in on stdin, results out on stdout."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    setup = _read_message(proto_in)
    policy, tokenizer_dir = setup["policy"], setup["tokenizer_dir"]
    try:
        tokenizer = load_reference_tokenizer(tokenizer_dir) if tokenizer_dir else None
        table = module_table(policy.allowed_imports)
        syscall_filter = build_syscall_filter() if policy.seccomp else None
    except Exception as e:
        _write_message(proto_out, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    read_dirs = [str(tokenizer_dir)] if tokenizer_dir else []
    workdir = tempfile.mkdtemp(prefix="attnprog-sandbox-")
    os.chmod(workdir, 0o500)
    import gc
    gc.freeze()  # keep the warm heap shared with the children
    _write_message(proto_out, {"ready": True, "pid": os.getpid(), "seccomp": syscall_filter is not None})
    try:
        while True:
            try:
                request = _read_message(proto_in)
            except EOFError:
                return
            if request is None:
                return
            job, limits = request
            try:
                reply = _run_job(job, limits, policy, table, tokenizer, read_dirs, workdir, syscall_filter)
            except Exception as e:  # a bug or bad request: report it, keep serving
                reply = e
            _write_message(proto_out, reply)
    finally:
        os.rmdir(workdir)


# ---------------------------------------------------------------------------------------------------------
# The client


# Only these variables reach the server: API keys and tokens in the caller's environment never do.
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _server_env() -> dict:
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONDONTWRITEBYTECODE="1",
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    return env


class _Server:
    """One sandbox server process and its pipes; used by one thread at a time."""

    def __init__(self, policy: Policy, tokenizer_dir):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from attnprog.sandbox import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_server_env(), close_fds=True)
        _write_message(self.proc.stdin.fileno(), {"policy": policy, "tokenizer_dir": tokenizer_dir})

    def wait_ready(self) -> None:
        try:
            reply = _read_message(self.proc.stdout.fileno())
        except EOFError:
            raise RuntimeError("sandbox: the server process died while starting") from None
        if not reply.get("ready"):
            self.close()
            raise RuntimeError(f"sandbox: the server could not start: {reply.get('error')}")
        self.seccomp = reply["seccomp"]

    def run(self, job: Job, limits: Limits) -> JobResult:
        _write_message(self.proc.stdin.fileno(), (job, limits))
        reply = _read_message(self.proc.stdout.fileno())
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                _write_message(self.proc.stdin.fileno(), None)
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Sandbox:
    """A pool of pre-warmed sandbox servers. `run_many(jobs)` runs jobs in parallel, one per server.
    With `tokenizer_dir`, the servers load that Hugging Face tokenizer once (reference programs need it;
    the folder is the only place a program may read)."""

    def __init__(self, tokenizer_dir=None, workers: int | None = None, policy: Policy = Policy()):
        self.tokenizer_dir = str(tokenizer_dir) if tokenizer_dir else None
        self.policy = policy
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._idle: queue.Queue = queue.Queue()
        servers = [_Server(policy, self.tokenizer_dir) for _ in range(self.workers)]
        try:
            for server in servers:
                server.wait_ready()
        except Exception:
            for server in servers:
                server.close()
            raise
        for server in servers:
            self._idle.put(server)
        self.seccomp = all(server.seccomp for server in servers)  # False where libseccomp is missing
        self._closed = False

    def run(self, job: Job, limits: Limits = Limits()) -> JobResult:
        server = self._idle.get()
        try:
            try:
                return server.run(job, limits)
            except (EOFError, OSError):  # the server died (it should not): report, replace it
                server.close()
                server = _Server(self.policy, self.tokenizer_dir)
                server.wait_ready()
                m = len(job.calls)
                message = "the sandbox server died while running this program"
                return JobResult("runtime_error", message, [None] * m, ["runtime_error"] * m, [message] * m)
        finally:
            self._idle.put(server)

    def run_many(self, jobs: list, limits: Limits = Limits()) -> list:
        if len(jobs) <= 1 or self.workers == 1:
            return [self.run(job, limits) for job in jobs]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: self.run(job, limits), jobs))

    def server_pids(self) -> list[int]:
        return [server.proc.pid for server in list(self._idle.queue)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while not self._idle.empty():
            self._idle.get().close()

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
