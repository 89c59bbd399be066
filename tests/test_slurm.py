"""The tiny workflow, to its final target, through profiles/slurm on a real single-node SLURM cluster
(started by tests/slurmfixture.py): every job is an sbatch job, per-head jobs go in groups, GPU rules ask
SLURM for a GPU."""
import re
import subprocess

import pytest

from slurmfixture import slurm_cluster  # noqa: F401  (the session fixture)
from tinyworld import REPO, tiny_config
from workflowrun import assert_results_valid, snakemake_cmd

pytestmark = pytest.mark.slow

# Rules that ask for a GPU in profiles/slurm/config.yaml.
GPU_RULES = {"extract", "substitute", "qa"}


def test_tiny_workflow_runs_to_the_end_through_the_slurm_profile(slurm_cluster, tiny_models, tmp_path):  # noqa: F811
    config = tiny_config({"tiny-llama": tiny_models["llama"]})
    cmd = snakemake_cmd(
        tmp_path, config, "--profile", str(REPO / "profiles/slurm"),
        # Test speed only: poll SLURM every few seconds (the profile waits 20 s), fail at once instead of
        # retrying, and put 2 heads per group job so that the group jobs share the node.
        "--slurm-init-seconds-before-status-checks", "2", "--retries", "0", "--group-components", "heads=2")
    run = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, timeout=1200)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"snakemake failed:\n{log[-8000:]}\n{slurm_cluster.logs()}"

    # Every job ran as an sbatch job (only `all` runs on the submitting host) ...
    submitted = dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/(\S+?)/", log))
    rules_run = set(re.findall(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):$", log, re.M))
    local = set(re.findall(r"^\s*localrule (\w+):$", log, re.M))
    assert local <= {"all"}, f"rules run outside SLURM: {local}"
    assert "rule_extract" in submitted.values()
    # ... per-head jobs went in groups ...
    if "synthesize" in rules_run:
        assert any(name.startswith("group_heads") for name in submitted.values())
        assert "rule_synthesize" not in submitted.values()
    # ... and GPU rules asked SLURM for a GPU.
    for jobid, name in submitted.items():
        details = slurm_cluster.run("scontrol", "show", "job", jobid)
        asked_gpu = "gpu" in details.split("TresPerJob=")[-1].split()[0] if "TresPerJob=" in details else False
        assert asked_gpu == (name.removeprefix("rule_") in GPU_RULES), f"{name}: {details}"

    # The run is complete: nothing left to do, and every result file reads.
    dry = subprocess.run(cmd + ["-n"], env=slurm_cluster.env, capture_output=True, text=True)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    assert_results_valid(tmp_path)
