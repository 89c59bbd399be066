"""Where the checkout and its Python live: a path with a space must either work or stop with one line.

- The workflow's own commands quote the paths they write (a checkout under "My projects/" runs).
- Snakemake runs `script:` jobs with its Python's path unquoted (snakemake#2645), so a Python under a path with
  a space is refused before any job runs, with a line that says what to do; `make` keeps the environment of a
  checkout under a space elsewhere, and refuses a VENV given under one before installing.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from attnprog.config import ConfigError
from attnprog.inputs import check_script_python
from tinyworld import REPO, run_snakemake, tiny_config, write_config

# What the workflow reads from its checkout (the Snakefile's folder): rules, scripts, package, configs, profiles.
CHECKOUT_PARTS = ("Snakefile", "workflow", "src", "config", "envs", "profiles")


def test_a_python_under_a_path_with_a_space_is_refused_by_name():
    check_script_python("/opt/envs/attnprog-3.11/bin/python")
    with pytest.raises(ConfigError, match=r"'/home/a b/\.venv/bin/python'.*snakemake#2645.*VENV="):
        check_script_python("/home/a b/.venv/bin/python")


def copy_checkout(folder: Path) -> Path:
    """The parts of this checkout the workflow reads, copied to `folder`."""
    folder.mkdir(parents=True)
    for part in CHECKOUT_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, folder / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder / part)
    return folder


@pytest.mark.slow
@pytest.mark.workflow
def test_a_checkout_under_a_path_with_a_space_runs_its_jobs(tiny_models, tmp_path):
    """Script jobs and the per-head shell jobs (synthesize, rerank: the script's path is in their command) of a
    checkout under a folder with a space, run by a Python elsewhere."""
    checkout = copy_checkout(tmp_path / "my projects" / "attnprog")
    workdir = tmp_path / "run"
    config = tiny_config({"tiny-gpt2": tiny_models["gpt2"]})
    run_snakemake(workdir, config, "results/tiny-gpt2/rerank/L0H0.npz", snakefile=checkout / "Snakefile")
    assert (workdir / "results/tiny-gpt2/synthesis/L0H0").is_dir()
    assert (workdir / "results/tiny-gpt2/rerank/L0H0.npz").is_file()


@pytest.mark.workflow
def test_snakemake_run_by_a_python_under_a_path_with_a_space_stops_with_one_line(tiny_models, tmp_path):
    """A real environment under "my envs/" (a venv that sees this one's packages) runs Snakemake: refused."""
    venv = tmp_path / "my envs" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "this_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    configfile = write_config(tiny_config({"tiny-gpt2": tiny_models["gpt2"]}), workdir / "config.yaml")
    result = subprocess.run([str(python), "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(workdir), "--configfile", str(configfile), "--cores", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{str(python)!r}" in errors[0] and "snakemake#2645" in errors[0], \
        result.stdout[-2000:] + result.stderr[-2000:]


def test_make_keeps_the_environment_of_a_checkout_under_a_space_elsewhere_and_refuses_one_given_there(tmp_path):
    """`make` puts the environment at VENV: .venv in the checkout, or under ~/.cache where the checkout's path has
    a space; a VENV given under a space stops make before anything is installed."""
    checkout = tmp_path / "my projects" / "attnprog"
    checkout.mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, checkout / name)
    make = lambda *args: subprocess.run(["make", "-n", "setup", *args], cwd=checkout, capture_output=True, text=True,
                                        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")})
    default = make()
    assert default.returncode == 0, default.stderr
    assert re.search(rf"^python3 -m venv {tmp_path}/home/\.cache/attnprog/venv-[0-9a-f]{{12}}$", default.stdout, re.M)
    spaced = make(f"VENV={tmp_path}/my envs/venv")
    assert spaced.returncode != 0 and "snakemake#2645" in spaced.stderr and not spaced.stdout
    given = make(f"VENV={tmp_path}/venv")
    assert given.returncode == 0 and f"python3 -m venv {tmp_path}/venv\n" in given.stdout
