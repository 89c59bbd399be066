"""The wall: an operating-system jail built from standard tools, for a threat model in which the attacker
runs arbitrary native code inside a program's process.

A warm worker (server.py) runs inside bubblewrap (`bwrap`):
- as uid/gid 65534 (nobody) with no supplementary groups, also as seen from the host: when the host is
  root, `unshare` and `setpriv` (util-linux) stage the read-only paths in a private mount namespace and
  drop to 65534 before bwrap starts; otherwise bwrap runs as the calling user;
- in new user, pid, ipc, net (no interfaces up), mount, uts and cgroup namespaces, unable to make new user
  namespaces, with every capability dropped and no_new_privs;
- seeing only what a program needs, read-only: the system libraries, the Python installation, the
  environment's site-packages, the attnprog source, NLTK data folders; a private 64 MB tmpfs on /tmp, a
  minimal /dev, its own /proc; the tokenizer is copied in (its folder is not bound);
- under a seccomp allow-list (`worker_filter`) for everything in the jail, and killed when its parent
  dies (--die-with-parent).
Each program then runs in a child the worker forks, which adds a tighter allow-list (`program_filter`: no
new processes or threads, no signals, no sockets, opening files read-only, writing only to its result
pipe) and resource limits (CPU, address space, no processes, few descriptors, file size 0, no core).
"""
import errno
import os
import resource
import shutil
import site
import sys
import tempfile
from pathlib import Path

JAIL_UID = JAIL_GID = 65534
RESULT_FD = 3            # the only descriptor a program's child may write to (besides /dev/null)
TMPFS_BYTES = 64 << 20
SYSTEM_LIBRARIES = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/usr/local/lib")
TOP_LEVEL_LIBRARIES = ("/lib", "/lib64", "/lib32", "/libx32")
NLTK_DATA_DIRS = ("~/nltk_data", "/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data",
                  "/usr/local/lib/nltk_data")


class JailError(RuntimeError):
    """The jail cannot be built on this machine (bubblewrap missing, namespaces refused)."""


# ---------------------------------------------------------------------------------------------------------
# What the jail sees


def _python_paths() -> tuple[list[str], list[str]]:
    """(folders to bind read-only, sys.path inside the jail): the Python installation, the environment's
    site-packages and the folder attnprog is imported from."""
    import attnprog
    source = str(Path(attnprog.__file__).resolve().parents[1])
    # resolved: the jail binds each folder at its real path (a `.venv` may be a link to an environment elsewhere)
    packages = [str(Path(p).resolve()) for p in site.getsitepackages() if os.path.isdir(p)]
    binds = [str(Path(sys.base_prefix).resolve()), str(Path(sys.executable).resolve().parent)]
    return binds + [source] + packages, [source] + packages


def read_only_paths() -> list[str]:
    """Every host folder the jail binds read-only (deduplicated: none inside another)."""
    python_binds, _ = _python_paths()
    nltk = [os.environ["NLTK_DATA"]] if os.environ.get("NLTK_DATA") else []
    nltk += [os.path.expanduser(p) for p in NLTK_DATA_DIRS]
    candidates = [p for p in SYSTEM_LIBRARIES if os.path.isdir(p) and not os.path.islink(p)]
    candidates += [p for p in TOP_LEVEL_LIBRARIES if os.path.isdir(p) and not os.path.islink(p)]
    candidates += python_binds + [p for p in nltk if os.path.isdir(p)]
    if os.path.isfile("/etc/ld.so.cache"):
        candidates.append("/etc/ld.so.cache")
    paths = []
    for p in sorted({str(Path(p).resolve()) for p in candidates}, key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths):
            paths.append(p)
    return paths


def jail_python_path() -> list[str]:
    return _python_paths()[1]


def _passed_env() -> dict:
    env = {"HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/tmp/hf"}
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NLTK_DATA"):  # see the environment notes
        if name in os.environ:
            env[name] = os.environ[name]
    return env


# ---------------------------------------------------------------------------------------------------------
# The command


def bwrap_path() -> str:
    path = shutil.which("bwrap")
    if not path:
        raise JailError("bubblewrap is not installed: run `make system` (tools/install_system_packages.sh) "
                        "or `apt-get install bubblewrap`")
    return path


# Run by `unshare --mount` as root: mount each read-only path under a fresh tmpfs that nobody may traverse,
# so that uid 65534 reaches them (/root is 0700), then drop to 65534 for good and start bwrap.
_STAGE_SCRIPT = r'''
set -eu
stage=$1; shift
mount -t tmpfs -o size=64k,mode=0755 attnprog-jail-stage "$stage"
i=0
while [ "$1" != "--" ]; do
  if [ -d "$1" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
  mount --bind "$1" "$stage/$i"
  mount -o remount,bind,ro "$stage/$i"
  i=$((i + 1)); shift
done
shift
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
'''


# What /proc shows of the host that Python does not need, hidden: kernel command line and version, boot
# id and every other kernel setting (/proc/sys), host-wide load, memory, pressure and device figures.
PROC_HIDDEN_FILES = ("cmdline", "version", "loadavg", "meminfo", "stat", "uptime", "vmstat", "zoneinfo",
                     "buddyinfo", "swaps", "partitions", "diskstats", "interrupts", "softirqs", "cpuinfo",
                     "modules", "kallsyms", "keys", "key-users", "timer_list", "sched_debug", "schedstat",
                     "mdstat", "consoles", "devices", "filesystems", "misc", "locks", "cgroups", "iomem",
                     "ioports", "kpagecount", "kpageflags", "kpagecgroup", "pagetypeinfo", "slabinfo",
                     "vmallocinfo", "sysrq-trigger", "kcore", "crypto", "execdomains", "dma", "fb",
                     "latency_stats", "mtrr")
PROC_HIDDEN_DIRS = ("sys", "pressure", "irq", "bus", "fs", "driver", "tty", "acpi", "scsi", "sysvipc",
                    "dynamic_debug")


def jail_command(argv: list[str], seccomp_fd: int, args_fd: int) -> tuple[list[str], bytes, str | None]:
    """(command line that runs `argv` in the jail, the NUL-separated arguments bwrap reads from `args_fd`,
    staging folder the caller removes afterwards or None). The arguments go through a descriptor so that
    the jail's pid 1 (bwrap) shows none of them in /proc/1/cmdline."""
    paths = read_only_paths()
    as_root = os.geteuid() == 0
    stage = tempfile.mkdtemp(prefix="attnprog-jail-") if as_root else None
    sources = [f"{stage}/{i}" for i in range(len(paths))] if as_root else paths
    command = ["--unshare-all", "--unshare-user", "--disable-userns",
               "--uid", str(JAIL_UID), "--gid", str(JAIL_GID), "--cap-drop", "ALL", "--die-with-parent",
               "--new-session", "--hostname", "jail", "--clearenv"]
    for name, value in _passed_env().items():
        command += ["--setenv", name, value]
    # The private /tmp first: mounted after the binds, it would hide those under /tmp (a checkout or an
    # environment there); mounted first, the binds land on top of it and stay read-only.
    command += ["--size", str(TMPFS_BYTES), "--tmpfs", "/tmp"]
    for source, path in zip(sources, paths):
        command += ["--ro-bind", source, path]
    for link in TOP_LEVEL_LIBRARIES + ("/bin",):
        if os.path.islink(link):
            command += ["--symlink", os.readlink(link), link]
    command += ["--proc", "/proc", "--dev", "/dev"]
    for name in PROC_HIDDEN_FILES:
        if os.path.exists(f"/proc/{name}"):
            command += ["--dev-bind", "/dev/null", f"/proc/{name}"]  # reads as empty
    for name in PROC_HIDDEN_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            command += ["--tmpfs", f"/proc/{name}", "--remount-ro", f"/proc/{name}"]
    command += ["--remount-ro", "/", "--chdir", "/", "--seccomp", str(seccomp_fd)]
    args = b"".join(a.encode() + b"\0" for a in command)
    command = [bwrap_path(), "--args", str(args_fd), "--"] + argv
    if as_root:
        command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _STAGE_SCRIPT, "sh",
                   stage, *paths, "--", *command]
    return command, args, stage


# ---------------------------------------------------------------------------------------------------------
# System calls


# The whole jail (the warm worker, and its children before they add their own filter): what Python needs
# to start, import, fork and watch its children, and write the tokenizer to /tmp. Not here, among others:
# sockets, ptrace, process_vm_*, mount and the new mount API, unshare/setns, bpf, perf_event_open, keyctl,
# io_uring, userfaultfd, System V and POSIX IPC, fanotify/inotify, reboot, module loading, clock setting.
WORKER_SYSCALLS = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "lseek", "close",
    "close_range", "open", "openat", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "getcwd", "chdir", "fchdir",
    "mkdir", "mkdirat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "ftruncate", "umask",
    "fadvise64", "fsync", "fdatasync",
    "mmap", "munmap", "mprotect", "mremap", "brk", "madvise", "msync", "mincore", "membarrier",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "rt_sigsuspend", "kill", "tgkill",
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "arch_prctl", "execve",
    "clone", "wait4", "waitid", "exit", "exit_group",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid",
    "getresgid", "getpgrp", "getpgid", "getsid", "setpgid", "setsid",
    "prlimit64", "getrlimit", "setrlimit", "getrusage", "times", "sysinfo", "uname", "getcpu",
    "sched_getaffinity", "sched_yield", "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep",
    "gettimeofday", "time", "getrandom", "pipe", "pipe2", "dup", "dup2", "dup3", "fcntl", "ioctl",
    "select", "pselect6", "poll", "ppoll", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "prctl", "seccomp", "restart_syscall")

# A program's child, on top of the worker's filter: reading what the jail shows, computing, writing
# results. Opening is allowed only without write flags; writing only to stdout/stderr (/dev/null) and the
# result pipe; ioctl only to ask whether a descriptor is a terminal.
PROGRAM_SYSCALLS = (
    "read", "readv", "pread64", "lseek", "close", "stat", "fstat", "lstat", "newfstatat", "statx", "access",
    "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "getcwd",
    "mmap", "munmap", "mprotect", "mremap", "brk", "madvise",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "futex", "sched_yield",
    "sched_getaffinity", "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    "time", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "getrandom", "getrlimit", "getrusage", "times", "uname", "exit", "exit_group",
    "restart_syscall")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | 0o20000000  # __O_TMPFILE
_TCGETS = 0x5401
_FCNTL_READS = (1, 2, 3)  # F_GETFD, F_SETFD, F_GETFL


def _add(filter_, action, name, *args) -> None:
    try:
        filter_.add_rule(action, name, *args)
    except Exception:  # not a system call on this architecture (open, stat on arm64)
        pass


def worker_filter():
    """The jail-wide allow-list (bwrap loads it before starting the worker). Anything else: EPERM."""
    import pyseccomp as sc
    f = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
    for name in WORKER_SYSCALLS:
        _add(f, sc.ALLOW, name)
    _add(f, sc.ERRNO(errno.ENOSYS), "clone3")  # glibc then falls back to clone, whose flags are checked
    return f


def program_filter():
    """The allow-list a program's child loads after the fork. Anything else: EPERM."""
    import pyseccomp as sc
    f = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
    for name in PROGRAM_SYSCALLS:
        _add(f, sc.ALLOW, name)
    for name, flags_arg in (("open", 1), ("openat", 2)):
        _add(f, sc.ALLOW, name, sc.Arg(flags_arg, sc.MASKED_EQ, _WRITE_FLAGS, 0))
    for name in ("write", "writev"):
        for fd in (1, 2, RESULT_FD):
            _add(f, sc.ALLOW, name, sc.Arg(0, sc.EQ, fd))
    _add(f, sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, _TCGETS))
    for command in _FCNTL_READS:
        _add(f, sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, command))
    _add(f, sc.ALLOW, "prlimit64", sc.Arg(2, sc.EQ, 0))  # reading limits only (new limit NULL)
    _add(f, sc.ERRNO(errno.ENOSYS), "clone3")
    return f


def compiled(filter_) -> bytes:
    """The filter as BPF (the jail has no libseccomp to compile one; it only loads bytes)."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as out:
        filter_.export_bpf(out)
    with os.fdopen(read_fd, "rb") as source:
        return source.read()


def write_worker_filter() -> int:
    """A pipe's read end holding the compiled worker filter, for `bwrap --seccomp FD`."""
    bpf = compiled(worker_filter())
    read_fd, write_fd = os.pipe()
    os.write(write_fd, bpf)  # a few kB: fits in the pipe's buffer
    os.close(write_fd)
    return read_fd


class FilterLoader:
    """Loads a compiled filter into the calling process with prctl (set up before the fork, so the child
    only makes the one call)."""
    _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2

    def __init__(self, bpf: bytes):
        import ctypes

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._program = SockFprog(len(bpf) // 8, ctypes.addressof(self._buffer))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._pointer = ctypes.byref(self._program)

    def load(self) -> None:
        if self._prctl(self._PR_SET_SECCOMP, self._SECCOMP_MODE_FILTER, self._pointer, 0, 0) != 0:
            raise OSError("could not load the program's seccomp filter")


# ---------------------------------------------------------------------------------------------------------
# Resource limits of one program's child


def program_rlimits(seconds_per_call: float, memory_mb: int, n_calls: int, used_bytes: int) -> list:
    """(limit, soft, hard) for a child that makes `n_calls` calls, forked from a worker of `used_bytes`
    address space: CPU (SIGXCPU at soft, SIGKILL at hard), address space, no processes or threads, a few
    descriptors, no file bytes, no core dumps, no locked memory, no message queues."""
    cpu = int(seconds_per_call * (n_calls + 2)) + 2
    memory = used_bytes + memory_mb * 2 ** 20
    return [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
            (resource.RLIMIT_NPROC, 0, 0), (resource.RLIMIT_NOFILE, 32, 32), (resource.RLIMIT_FSIZE, 0, 0),
            (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_MEMLOCK, 0, 0), (resource.RLIMIT_MSGQUEUE, 0, 0)]


# ---------------------------------------------------------------------------------------------------------
# Resource limits of the warm worker itself

WORKER_ADDRESS_SPACE = 16 << 30   # the worker and each program's child (numpy, spaCy loaded: ~0.3 GB)
WORKER_CPU_SECONDS = 4 * 3600     # its own CPU (not its children's); SIGXCPU then SIGKILL: the host replaces it
WORKER_PROCESSES = 512            # processes of uid 65534 on the host (every jail's), only when that uid is its own
WORKER_FILES = 256


def worker_rlimits(own_uid: bool) -> list:
    """(limit, soft, hard) the worker sets on itself before it reads any job; with no capability in the
    jail it cannot raise them again. No cgroup: the jail's limits must hold wherever bubblewrap runs, and
    a cgroup needs a writable hierarchy the host may not have. The process limit counts the uid's
    processes host-wide, so it is set only when the jail runs as uid 65534 (`own_uid`, the host is root),
    not as the calling user."""
    limits = [(resource.RLIMIT_AS, WORKER_ADDRESS_SPACE, WORKER_ADDRESS_SPACE),
              (resource.RLIMIT_CPU, WORKER_CPU_SECONDS, WORKER_CPU_SECONDS + 60),
              (resource.RLIMIT_NOFILE, WORKER_FILES, WORKER_FILES), (resource.RLIMIT_FSIZE, TMPFS_BYTES, TMPFS_BYTES),
              (resource.RLIMIT_CORE, 0, 0)]
    if own_uid:
        limits.append((resource.RLIMIT_NPROC, WORKER_PROCESSES, WORKER_PROCESSES))
    return limits
