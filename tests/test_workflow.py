"""The whole workflow on tiny random-weight models (GPT-2 and Llama with GQA), run by Snakemake for real."""
import json

import pandas as pd
import pytest

from attnprog import extract
from tinyworld import run_snakemake, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tiny_models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config({"tiny-gpt2": tiny_models["gpt2"], "tiny-llama": tiny_models["llama"]})
    result = run_snakemake(workdir, config)
    return workdir, config, result


def test_every_model_is_extracted(tiny_run):
    workdir, config, _ = tiny_run
    for model in config["models"]:
        info = json.loads((workdir / f"results/{model}/model/info.json").read_text())
        examples = pd.read_parquet(workdir / f"results/{model}/data/examples.parquet")
        assert len(examples) == 12
        for layer in range(info["n_layers"]):
            for head in range(info["n_heads"]):
                attention = extract.read_head_attention(workdir / f"results/{model}/attention/layer{layer}.parquet",
                                                        head)
                assert sorted(attention) == sorted(examples["example_id"])


def test_rerun_has_nothing_to_do(tiny_run):
    workdir, config, _ = tiny_run
    result = run_snakemake(workdir, config, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr
