"""A real single-node SLURM cluster for the tests (Debian's slurm-wlm + munge, no systemd).

`start_cluster()` installs the packages when they are missing (as root), makes a folder under REGISTRY
holding the cluster's slurm.conf, state and logs, starts a munged of its own (own socket), slurmctld and
slurmd directly (free ports), and waits until the node is idle. Clients find the cluster through
SLURM_CONF (see `LocalSlurm.env`), and also through a symlink /etc/slurm/slurm.conf -> the folder's
slurm.conf, because snakemake-executor-plugin-slurm-jobstep (0.6.1) drops SLURM_CONF from the
environment of the `srun` it runs inside each job. One cluster at a time, then: a session holds
REGISTRY/lock while its cluster runs. `stop()` cancels the jobs, stops the daemons by PID and removes the
folder and the symlink.

The node is declared as a small GPU node (8 CPUs, 64 GB, one GPU), so the slurm profile's requests are
accepted as on a real cluster: `SlurmdParameters=config_overrides` keeps SLURM from draining a node that
has less hardware than declared, and the "GPU" is /dev/null (jobs see CUDA_VISIBLE_DEVICES=0, torch finds
no CUDA device and runs on the CPU).

A cluster left behind by a killed test session (its owner process is gone) is stopped when the next one
starts: every process whose command line or environment names the old folder is killed.
"""
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGISTRY = Path(tempfile.gettempdir()) / "attnprog-slurm"   # one folder per running cluster
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")                 # where srun looks without SLURM_CONF
NODE_CPUS, NODE_MEM_MB, NODE_GPUS = 8, 64000, 1

SLURM_CONF = """\
ClusterName=attnprog-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# squeue is the status command (no accounting): finished jobs must stay visible for a while.
MinJobAge=600
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation={dir}/ctld
SlurmdSpoolDir={dir}/slurmd
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
NodeName={host} CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={mem} Gres=gpu:{gpus}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    folder: Path
    conf: Path
    lock: object = None                          # the open REGISTRY/lock, held while the cluster runs
    procs: dict = field(default_factory=dict)   # daemon name -> Popen

    @property
    def env(self) -> dict:
        """The environment for SLURM clients (sbatch, squeue, snakemake --executor slurm)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True).stdout

    def node_state(self) -> str:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return r.stdout.strip()

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", str(os.getuid())], env=self.env, capture_output=True)
        try:  # let slurmstepd end the cancelled jobs' processes before slurmd goes
            wait_for(lambda: not self.run("squeue", "-h", "-t", "running,completing").strip(), 15, "")
        except (RuntimeError, subprocess.CalledProcessError):
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.procs:
                stop_process(self.procs[name])
        if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.readlink() == self.conf:
            SYSTEM_CONF.unlink()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.lock:
            self.lock.close()  # releases the flock

    def logs(self) -> str:
        """The tail of the daemons' logs, for error messages."""
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stderr", "slurmd.stderr", "munge/munged.log"):
            path = self.folder / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(out)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ensure_packages() -> None:
    """Install slurm-wlm and munge with apt when missing; skip (with the reason) where we cannot."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.getuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("a local SLURM needs root and apt-get to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def stop_leftover_clusters() -> None:
    """Kill the processes of clusters whose test session died without stopping them."""
    for folder in filter(Path.is_dir, REGISTRY.iterdir()):
        owner = folder / "owner"
        if owner.exists() and pid_alive(int(owner.read_text())):
            continue  # a live session's cluster
        if not owner.exists() and time.time() - folder.stat().st_mtime < 60:
            continue  # being set up right now
        mark = str(folder).encode()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if mark in (proc / "cmdline").read_bytes() or mark in (proc / "environ").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(folder, ignore_errors=True)
    if SYSTEM_CONF.is_symlink() and not SYSTEM_CONF.exists():
        SYSTEM_CONF.unlink()


def ours(path: Path) -> bool:
    """Whether /etc/slurm/slurm.conf is missing or one of our symlinks."""
    return not path.exists() and not path.is_symlink() or path.is_symlink() and REGISTRY in path.readlink().parents


def lock_registry(timeout: float = 1800):
    """Wait until no other session runs a cluster (the flock goes away with a killed session)."""
    lock = open(REGISTRY / "lock", "w")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another test session has held {REGISTRY}/lock for {timeout:.0f} s")
            time.sleep(1)


def munge_works(socket_path: Path) -> bool:
    r = subprocess.run(f"munge -S {socket_path} -n | unmunge -S {socket_path}", shell=True, capture_output=True)
    return r.returncode == 0


def start_munged(folder: Path) -> subprocess.Popen:
    """A munged of this cluster's own, so that stopping it cannot break another cluster."""
    # munged refuses to run as root; the Debian package made the munge user and /etc/munge/munge.key.
    folder.mkdir()
    shutil.chown(folder, "munge", "munge")
    proc = subprocess.Popen(
        ["/usr/sbin/munged", "--foreground", "--force", f"--socket={folder}/munge.socket",
         f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed", f"--log-file={folder}/munged.log"],
        user="munge", group="munge", start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(folder.parent / "munged.stderr", "w"))
    wait_for(lambda: munge_works(folder / "munge.socket"), 10, "munged did not start")
    return proc


def wait_for(check, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.3)


def start_cluster() -> LocalSlurm:
    """Start a single-node SLURM cluster whose conf, state and logs live in a new folder of REGISTRY."""
    ensure_packages()
    if not ours(SYSTEM_CONF):
        pytest.skip(f"{SYSTEM_CONF} holds a real SLURM configuration; the test cluster leaves it alone")
    REGISTRY.mkdir(exist_ok=True)
    lock = lock_registry()
    stop_leftover_clusters()
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=REGISTRY))
    (folder / "owner").write_text(str(os.getpid()))
    folder.chmod(0o755)  # munged (user munge) must reach its socket folder
    (folder / "ctld").mkdir()
    (folder / "slurmd").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=folder, ctld_port=free_port(), slurmd_port=free_port(),
                                      cpus=NODE_CPUS, mem=NODE_MEM_MB, gpus=NODE_GPUS))
    (folder / "gres.conf").write_text(f"NodeName={host} Name=gpu File=/dev/null\n")
    cluster = LocalSlurm(folder, conf, lock)
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SYSTEM_CONF.unlink(missing_ok=True)  # a leftover symlink of ours (checked above)
    SYSTEM_CONF.symlink_to(conf)
    try:
        cluster.procs["munged"] = start_munged(folder / "munge")
        for daemon in ("slurmctld", "slurmd"):
            cluster.procs[daemon] = subprocess.Popen(
                [daemon, "-D", "-f", str(conf)], env=cluster.env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=open(folder / f"{daemon}.stderr", "w"))
        wait_for(lambda: cluster.node_state() == "idle", 30, "the SLURM node did not become idle")
    except RuntimeError as err:
        logs = cluster.logs()
        cluster.stop()
        raise RuntimeError(f"{err}\n{logs}") from None
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM cluster for the whole test session."""
    cluster = start_cluster()
    yield cluster
    cluster.stop()
