"""The `qa` rule: one lm-eval task at each replacement fraction (and method), each compared question by
question with the unmodified model.

The model is lm-eval's own HF wrapper around the substituted model; a fraction replaces the heads with the
best programs, best val IoU first, as in the perplexity sweep. Each run's per-question record is written to
`{task}.partial.json` as soon as it is computed: a job that fails later (in another run, or while summing up)
loses nothing, and its rerun evaluates only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from ..contracts import HeadId
from ..settings import QASettings
from .langtest import QAError
from .paired import paired_comparison
from .tasks import QATask, lm_eval_task, resolve_task, task_files

METRICS = ("acc", "acc_norm")
BASELINE = "none"  # the record key of the unmodified model (no head replaced), shared by every method


# ---------------------------------------------------------------------------------------------------------
# One lm-eval run -> a JSON record


def chosen_answers(sample: dict, delimiter: str) -> dict[str, int | None]:
    """The choice a multiple-choice question was answered with, per metric: acc takes the highest
    log-likelihood, acc_norm the highest per character of the choice (lm-eval's own rule). None where that
    does not reproduce lm-eval's score for the question (e.g. a task with its own process_results)."""
    try:
        lls = np.array([float(resp[0]) for resp in sample["filtered_resps"]])
        lengths = np.array([len(continuation) - len(delimiter) for _, continuation in sample["arguments"]], float)
    except (KeyError, TypeError, ValueError, IndexError):
        return {}
    if not len(lls) or len(lls) != len(lengths):
        return {}
    with np.errstate(divide="ignore", invalid="ignore"):
        picks = {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / lengths))}
    target = sample.get("target")
    answers = {}
    for metric, pick in picks.items():
        if isinstance(sample.get(metric), (int, float)):
            correct = pick in target if isinstance(target, list) else pick == target
            answers[metric] = pick if correct == bool(sample[metric]) else None
    return answers


def evaluation_record(out: dict) -> dict:
    """What one lm-eval run computed, as plain JSON: `results` {task or group: {"acc,none": value, ...}} and
    `questions`, one {id, scores {metric: 0/1}, answers {metric: choice}} per question (id: the doc_id, or
    "subtask/doc_id" for a group)."""
    results = {name: {key: float(value) for key, value in metrics.items()
                      if isinstance(value, (int, float)) and not isinstance(value, bool)}
               for name, metrics in out["results"].items()}
    samples = out.get("samples", {})
    questions = []
    for subtask, subtask_samples in sorted(samples.items()):
        delimiter = out.get("configs", {}).get(subtask, {}).get("target_delimiter", " ")
        for sample in subtask_samples:
            questions.append({
                "id": sample["doc_id"] if len(samples) == 1 else f"{subtask}/{sample['doc_id']}",
                "scores": {m: float(sample[m]) for m in METRICS if isinstance(sample.get(m), (int, float))},
                "answers": chosen_answers(sample, delimiter)})
    return {"results": results, "questions": questions}


def evaluate(lm, spec: str, limit: int | None, manager) -> dict:
    """Run one lm-eval task (`spec`: a name or a YAML path) on `lm`; returns its evaluation_record."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[spec], task_manager=manager, limit=limit, log_samples=True)
    return evaluation_record(out)


# ---------------------------------------------------------------------------------------------------------
# Records kept on disk as they are computed


def fingerprint(info, task: QATask, library, data_file, settings: QASettings, noncausal: str,
                orders_path=None, tuned_dir=None) -> dict:
    """What a run's result depends on besides its method and fraction: saved records are reused only under
    the same fingerprint."""
    from dataclasses import asdict

    programs = hashlib.sha256()
    program_files = [(path.name, path) for path in sorted(Path(library.program_dir).glob("*.py"))]
    if tuned_dir and Path(tuned_dir).is_dir():  # the tuned method's programs, which a tuned headline runs
        program_files += [(f"tuned/{path.relative_to(tuned_dir)}", path)
                          for path in sorted(Path(tuned_dir).rglob("*")) if path.is_file()]
    for name, path in program_files:
        programs.update(name.encode() + b"\0" + path.read_bytes())
    files = {"best": library.best, "programs_table": library.programs, "data": data_file, "orders": orders_path,
             **{f"task_file {path}": path for path in task_files(task)}}  # the YAML, its includes and data
    return {"model": asdict(info), "task": task.as_dict(), "questions": settings.questions,
            "batch_size": settings.batch_size, "noncausal": noncausal, "programs": programs.hexdigest(),
            **{name: hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path in files.items() if path}}


class PartialResults:
    """Each run's record, written to `path` as soon as it is computed; on start, the records a failed job left
    under the same fingerprint."""

    def __init__(self, path, fingerprint: dict, log=print):
        self.path, self.fingerprint = Path(path), json.loads(json.dumps(fingerprint))
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") == self.fingerprint:
                self.records = saved["records"]
                log(f"qa: resuming from {self.path}: {len(self.records)} runs already computed")
            else:
                log(f"qa: ignoring {self.path}: computed for other settings, library or data")

    def add(self, key: str, record: dict) -> None:
        from ..atomic import write_json

        self.records[key] = record
        write_json(self.path, {"fingerprint": self.fingerprint, "records": self.records})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def partial_path(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".json") + ".partial.json")


# ---------------------------------------------------------------------------------------------------------
# Runs -> rows


def plan_runs(ranked: list[HeadId], n_total: int, settings: QASettings) -> list[tuple[str, float, list]]:
    """(method, fraction, heads) of every run; fraction 0 (the unmodified model, which the paired comparisons
    need) always. A fraction replaces round(fraction x all heads) heads, never more than have a program."""
    fractions = sorted({0.0, *map(float, settings.fractions)})
    return [(method, fraction, ranked[: min(round(fraction * n_total), len(ranked))])
            for method in settings.methods for fraction in fractions]


def record_key(method: str, heads: list) -> str:
    """Runs with the same key compute the same thing (fraction 0 of every method; fractions beyond the heads
    that have programs)."""
    return BASELINE if not heads else f"{method}/{len(heads)}"


def reported_metric(records: list[dict]) -> str | None:
    """The metric the paired comparison uses: acc_norm (the paper's length-normalised accuracy) where every
    question has it, else acc, else none."""
    for metric in ("acc_norm", "acc"):
        if all(metric in q["scores"] for record in records for q in record["questions"]):
            return metric
    return None


def task_row(name: str, record: dict, baseline: dict, metric: str | None) -> dict:
    """One run's row: lm-eval's accuracies and standard errors, and the paired comparison with `baseline`
    on `metric`, with the per-question `correct` (0/1) and `answer` (choice index) lists it was computed
    from, in the order of the baseline's questions."""
    results = record["results"].get(name, {})
    row = {"n_questions": len(record["questions"])}
    for m in METRICS:
        if f"{m},none" in results:
            row[m] = results[f"{m},none"]
            stderr = results.get(f"{m}_stderr,none")
            row[f"{m}_stderr"] = stderr if stderr is not None and math.isfinite(stderr) else None
    if metric is None:
        return row
    ids = question_ids(baseline)
    before, after = ({q["id"]: q for q in r["questions"]} for r in (baseline, record))
    if sorted(map(str, after)) != sorted(map(str, ids)):
        raise QAError(f"qa: {name}: a run saw other questions than the unmodified model")
    correct = [after[i]["scores"][metric] for i in ids]
    answers = [after[i]["answers"].get(metric) for i in ids]
    row.update(metric=metric, **paired_comparison([before[i]["scores"][metric] for i in ids], correct,
                                                  [before[i]["answers"].get(metric) for i in ids], answers))
    return {**row, "correct": correct, "answer": answers}


def question_ids(record: dict) -> list:
    return [q["id"] for q in record["questions"]]


def results_line(record: dict, name: str) -> str:
    results = record["results"].get(name, {})
    return ", ".join(f"{m}={results[f'{m},none']:.3f}" for m in METRICS if f"{m},none" in results) or "no accuracy"


# ---------------------------------------------------------------------------------------------------------
# The rule


def qa_task(info, task: QATask | str, library, data_file, settings: QASettings, noncausal: str, out_path,
            device: str, log=print, include_path=None, orders_path=None, tuned_dir=None) -> dict:
    """The `qa` rule: one task (a QATask, or as configured: an offline or registry name, a YAML path, or a
    name defined under `include_path`) at each (method, fraction), for a ModelInfo and the LibraryFiles of
    its library; writes {name}.json (see `task_row`). Heads are replaced in the substitution sweep's headline
    order (orders.parquet at `orders_path`), or without one in descending val IoU. Where the headline is the
    `tuned` method, each fraction runs the programs tuned for it (the substitution's tuned folder, `tuned_dir`)."""
    from functools import partial

    from lm_eval.models.huggingface import HFLM

    from .. import substitute
    from ..atomic import write_json
    from ..data import token_strings
    from ..models import load_model, load_tokenizer

    task = task if isinstance(task, QATask) else resolve_task(task, include_path)
    saved = PartialResults(partial_path(out_path),
                           fingerprint(info, task, library, data_file, settings, noncausal, orders_path, tuned_dir), log)
    tokenizer, model = load_tokenizer(info), load_model(info, device)
    replacer = substitute.install(model, partial(token_strings, tokenizer))
    best = substitute.read_best(library.best)
    programs = substitute.program_replacements(library.program_dir, library.programs, best, info.tokenizer_dir,
                                               noncausal, log)
    if orders_path:
        order_name, order = substitute.read_headline_order(orders_path)
        ranked = [head for head in order if head in programs]
    else:
        order_name, ranked = "programs", substitute.orders.iou_order(best, programs)
    if order_name == "tuned" and not tuned_dir:
        raise ValueError("qa: the headline order is the tuned method's; its tuned programs (tuned_dir) are needed")
    runs = plan_runs(ranked, info.n_heads_total, settings)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)

    with tempfile.TemporaryDirectory() as work_dir:
        spec, manager = lm_eval_task(task, data_file, work_dir)
        for method, fraction, heads in runs:
            key = record_key(method, heads)
            if key in saved.records:
                continue
            if method == "uniform":
                replacement = lambda head: substitute.uniform_attention
            elif order_name == "tuned" and heads:
                replacement = substitute.tuned_replacements(tuned_dir, fraction, programs, info.tokenizer_dir).get
            else:
                replacement = programs.get
            replacer.set_heads({head: replacement(head) for head in heads})
            saved.add(key, evaluate(lm, spec, settings.questions, manager))
            log(f"qa: {task.name} {method} fraction={fraction:g} ({len(heads)} heads): "
                f"{results_line(saved.records[key], task.name)}")
    replacer.set_heads({})

    records = [saved.records[record_key(method, heads)] for method, _, heads in runs]
    metric = reported_metric(records)
    rows = [{"method": method, "fraction": fraction, "n_replaced": len(heads),
             **task_row(task.name, record, saved.records[BASELINE], metric)}
            for (method, fraction, heads), record in zip(runs, records)]
    result = {"model": info.model, "task": task.name, "metric": metric, "order": order_name,
              "question_ids": question_ids(saved.records[BASELINE]), "rows": rows}
    write_json(out_path, result)
    saved.remove()
    return result
