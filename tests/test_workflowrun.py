"""The operations tests' result check reads every file through its contract, so a wrong schema fails it."""
import json

import pandas as pd
import pytest

from attnprog.contracts import BEST, ContractError
from workflowrun import assert_results_valid

BEST_ROW = {"layer": 0, "head": 1, "program": "p", "val_iou": 0.5, "test_iou": 0.4, "synth_iou": 0.6, "causal": True,
            "val_output_error": None, "test_output_error": None, "synth_output_error": None}


def test_a_result_with_the_contracts_schema_passes(tmp_path):
    BEST.write(pd.DataFrame([BEST_ROW]), tmp_path / "results/m/library/best.parquet")
    assert_results_valid(tmp_path)


@pytest.mark.parametrize("change", [{"drop": "val_iou"}, {"retype": "layer"}])
def test_a_result_with_a_wrong_schema_fails(change, tmp_path):
    frame = pd.DataFrame([BEST_ROW])
    if "drop" in change:
        frame = frame.drop(columns=[change["drop"]])
    else:
        frame[change["retype"]] = frame[change["retype"]].astype(str)
    path = tmp_path / "results/m/library/best.parquet"
    path.parent.mkdir(parents=True)
    frame.to_parquet(path)  # what parsing alone accepts
    with pytest.raises(ContractError):
        assert_results_valid(tmp_path)


def test_a_parquet_file_without_a_contract_fails(tmp_path):
    path = tmp_path / "results/m/library/extra.parquet"
    path.parent.mkdir(parents=True)
    pd.DataFrame([BEST_ROW]).to_parquet(path)
    with pytest.raises(AssertionError, match="no contract"):
        assert_results_valid(tmp_path)


@pytest.mark.parametrize("where", ["m/library/summary.json", "m/substitution/summary.json", "m/qa/summary.json",
                                   "transfer/a/b.json", "m/model/info.json"])
def test_a_stage_summary_that_breaks_its_record_fails(where, tmp_path):
    path = tmp_path / "results" / where
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"model": "m"}))  # valid JSON, but not the record
    with pytest.raises(ContractError, match=f"{path}: missing field"):
        assert_results_valid(tmp_path)
