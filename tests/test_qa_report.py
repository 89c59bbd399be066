"""The report's QA part: the paired comparison with the unmodified model, per task and method."""
import re

import numpy as np
import pytest

from attnprog.contracts import QASummary
from attnprog.report import figures


def paired_summary():
    """qa/summary.json as attnprog.qa.summarise_qa writes it: copa scored by acc (no acc_norm)."""
    rows = []
    for task, metric in (("piqa", "acc_norm"), ("copa", "acc")):
        for method, slope in (("programs", -0.1), ("uniform", -0.3)):
            for fraction in (0, 0.25, 0.5):
                diff = slope * fraction
                row = {"task": task, "method": method, "fraction": fraction, "n_replaced": round(8 * fraction),
                       "n_questions": 100, "acc": 0.6 + diff, "acc_stderr": 0.05, "metric": metric,
                       "n_changed": round(40 * fraction), "n_better": 2, "n_worse": 2 + round(-100 * diff),
                       "diff": diff, "diff_lo": diff - 0.04, "diff_hi": diff + 0.04, "mcnemar_p": 0.5 - fraction}
                if metric == "acc_norm":
                    row.update(acc_norm=0.5 + diff, acc_norm_stderr=0.05)
                rows.append(row)
    return QASummary(model="m", metrics={"piqa": "acc_norm", "copa": "acc"}, tasks={}, results=rows, max_drop={})


def test_qa_table_carries_the_paired_comparison_on_each_tasks_metric():
    table = figures.qa_table(paired_summary())
    piqa = table[(table.task == "piqa") & (table.method == "programs")].set_index("fraction")
    assert (piqa["metric"] == "acc_norm").all() and piqa.loc[0.5, "acc"] == pytest.approx(0.45)
    assert piqa.loc[0.5, "diff"] == pytest.approx(-0.05) and piqa.loc[0.5, "diff_hi"] == pytest.approx(-0.01)
    assert piqa.loc[0.25, "n_changed"] == 10 and piqa.loc[0.25, "mcnemar_p"] == pytest.approx(0.25)
    copa = table[table.task == "copa"]
    assert (copa["metric"] == "acc").all() and copa["lo"].notna().all()


def test_qa_figure_plots_the_paired_difference_per_task_and_method():
    svg, note = figures.qa_figure(paired_summary())
    assert svg.startswith("<svg") or "<svg" in svg[:500]
    assert "paired difference" in note and "McNemar" in note
    for text in ("piqa (acc_norm, 100 questions)", "copa (acc, 100 questions)", "accuracy change (points)",
                 "p=0.25", "uniform matrix, same heads"):
        assert text in svg, text
    old = QASummary(model="m", metrics={}, tasks={}, max_drop={},
                    results=[{k: v for k, v in row.items() if k in ("task", "method", "fraction", "acc", "acc_stderr")}
                             for row in paired_summary().results])
    svg, note = figures.qa_figure(old)  # a summary from before the paired comparison: accuracy with its bands
    assert "<svg" in svg and "standard errors" in note and "accuracy change" not in svg


def test_qa_cell_says_how_many_answers_changed():
    cell = figures.qa_cell(paired_summary(), 0.25)
    before, after, changed, questions = re.match(r"([\d.]+) → ([\d.]+) \((\d+) of (\d+) answers changed\)",
                                                cell).groups()
    assert float(before) == pytest.approx(np.mean([0.5, 0.6])) and float(after) == pytest.approx(np.mean([0.475, 0.575]))
    assert (int(changed), int(questions)) == (20, 200)
    assert figures.qa_cell(None, 0.25) == "–"
