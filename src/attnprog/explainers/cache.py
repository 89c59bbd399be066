"""On-disk state shared by every synthesis job: explainer replies stored by content, and the spend ledger.

A paid reply must never be asked for twice. Each reply is stored under the SHA-256 of the exact request
(model id, prompt, parameters), written atomically, so a rerun, a resumed run or a second model asking the
same question reads it back for free, and parallel jobs never see a half-written file. Two jobs racing on
the same request may both pay for it once; both then write the same key and the last rename wins.

The ledger is an append-only JSON-lines file of what was actually paid, guarded by an `fcntl` lock so that
parallel per-head jobs share one run-wide budget (the lock works across processes on one machine and on
NFS v4 shares that support POSIX locks, as SLURM clusters usually have).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

from attnprog.atomic import write_json


class BudgetExhausted(RuntimeError):
    """The next request could take spending past the configured budget."""


def request_key(request: dict) -> str:
    """SHA-256 of the request's canonical JSON: the same question always has the same key."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ReplyCache:
    """Replies stored as `{folder}/replies/{key[:2]}/{key}.json`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / "replies" / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None

    def put(self, key: str, record: dict) -> None:
        write_json(self.path(key), record)


class SpendLedger:
    """Dollars paid through this cache folder, shared by parallel jobs.

    `check` refuses a request whose worst-case cost would cross the budget given what is already paid; with
    N jobs running at once the total can exceed the budget by at most N requests' worth (each job checked
    before the others' replies were recorded)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / "spend.jsonl"

    @contextlib.contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "spend.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _spent_unlocked(self) -> float:
        if not self.path.exists():
            return 0.0
        total = 0.0
        for line in self.path.read_text().splitlines():
            try:
                total += float(json.loads(line)["cost_usd"])
            except (ValueError, KeyError, TypeError):  # a line cut by a crash mid-write: skip it
                continue
        return total

    def spent(self) -> float:
        with self._locked():
            return self._spent_unlocked()

    def check(self, budget_usd: float | None, next_cost_usd: float) -> None:
        """Raise BudgetExhausted if paying `next_cost_usd` more could take the total past `budget_usd`."""
        if budget_usd is None:
            return
        spent = self.spent()
        if spent + next_cost_usd > budget_usd:
            raise BudgetExhausted(
                f"synthesis budget reached: ${spent:.4f} of ${budget_usd:.2f} spent and the next request may cost "
                f"up to ${next_cost_usd:.4f}; raise the budget to go on (paid replies are cached and reused)")

    def record(self, key: str, cost_usd: float, usage: dict) -> None:
        line = json.dumps({"time": time.time(), "key": key, "cost_usd": cost_usd, **usage}) + "\n"
        with self._locked():
            # One write() in append mode: concurrent appends never interleave within a line.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
