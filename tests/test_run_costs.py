"""What a run cost: benchmark files as Snakemake itself writes them, read back per job and per stage."""
import os

import pytest
from snakemake.benchmark import BenchmarkRecord, write_benchmark_records

from attnprog import run_costs


def write_job(folder, rule, model=None, job=None, *, seconds, end, max_rss=None):
    """A job's benchmark file, written by Snakemake's own writer, ending at `end` (Unix seconds)."""
    path = folder.parent / run_costs.benchmark_path(rule, model, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = BenchmarkRecord(running_time=seconds, max_rss=max_rss, cpu_time=seconds)
    record.data_collected = max_rss is not None
    record.process_gone = max_rss is None  # a job over before the first sample: NA, as Snakemake writes it
    write_benchmark_records([record], str(path), False)
    os.utime(path, (end, end))
    return path


def test_benchmark_path_is_the_layout_the_reader_parses():
    assert run_costs.benchmark_path("rerank", "{model}", "L{layer}H{head}") == "benchmarks/{model}/rerank/L{layer}H{head}.tsv"
    assert run_costs.benchmark_path("report") == "benchmarks/_shared/report.tsv"
    assert run_costs.benchmark_path("transfer", job="{source}/{target}") == "benchmarks/_shared/transfer/{source}/{target}.tsv"


def test_jobs_and_stages_are_read_back_with_walls_as_spans_not_sums(tmp_path):
    folder = tmp_path / "benchmarks"
    t0 = 1_800_000_000
    write_job(folder, "extract", "m1", seconds=50, end=t0 + 50, max_rss=900.5)
    # two heads side by side, then a third: the stage's wall is 30 s, its jobs' sum 50 s
    write_job(folder, "synthesize", "m1", "L0H0", seconds=20, end=t0 + 70, max_rss=210)
    write_job(folder, "synthesize", "m1", "L0H1", seconds=20, end=t0 + 70, max_rss=250)
    write_job(folder, "synthesize", "m1", "L1H0", seconds=10, end=t0 + 80)  # not sampled: no memory figure
    write_job(folder, "report", seconds=5, end=t0 + 100, max_rss=100)
    write_job(folder, "transfer", job="m1/m2", seconds=3, end=t0 + 90)

    jobs = run_costs.read_benchmarks(folder)
    assert len(jobs) == 6
    head = jobs[(jobs["rule"] == "synthesize") & (jobs["job"] == "L1H0")].iloc[0]
    assert (head["model"], head["seconds"], head["start"], head["end"]) == ("m1", 10, t0 + 70, t0 + 80)
    assert head["max_rss_mb"] != head["max_rss_mb"]  # NaN
    shared = jobs[jobs["model"] == ""].set_index("rule")
    assert shared.loc["transfer", "job"] == "m1/m2" and shared.loc["report", "job"] == ""

    costs = run_costs.stage_costs(jobs)
    assert list(zip(costs["model"], costs["rule"])) == [("m1", "extract"), ("m1", "synthesize"), ("", "transfer"),
                                                        ("", "report")]  # in the order the stages started
    synth = costs.set_index("rule").loc["synthesize"]
    assert (synth["jobs"], synth["wall_s"], synth["job_s"], synth["max_rss_mb"]) == (3, 30, 50, 250)
    assert costs.set_index("rule").loc["extract", "max_rss_mb"] == pytest.approx(900.5)

    text = run_costs.format_costs(costs)
    assert "(shared)" in text and text.splitlines()[-1] == "first job start to last job end: 1.7 min"


def test_model_filter_and_clear_errors(tmp_path, capsys):
    folder = tmp_path / "benchmarks"
    with pytest.raises(FileNotFoundError, match="no benchmark files"):
        run_costs.read_benchmarks(folder)
    write_job(folder, "extract", "m1", seconds=5, end=1_800_000_000)
    run_costs.main([str(folder), "--model", "m1"])
    assert "extract" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no benchmark files of model 'm2'"):
        run_costs.main([str(folder), "--model", "m2"])
    (folder / "stray.tsv").write_text("s\n1\n")
    with pytest.raises(ValueError, match="not a benchmark file of this workflow"):
        run_costs.read_benchmarks(folder)
