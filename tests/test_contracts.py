"""The records between rules: head names written and read one way, each stage's summary read with its fields
and types checked (a malformed file fails in one line naming the file and the field)."""
import json
from dataclasses import replace

import pytest

from attnprog.contracts import (Candidate, ContractError, HeadId, HeadlineMethod, LibrarySummary, Manifest, ModelInfo,
                                QASummary, SingleHeadStats, SubstitutionSummary, TransferHead, TransferProgram,
                                TransferSummary)


@pytest.mark.parametrize("head", [HeadId(0, 0), HeadId(3, 5), HeadId(27, 31), HeadId(100, 7)])
def test_head_names_round_trip(head):
    assert HeadId.parse(head.name) == head
    assert head.name == f"L{head.layer}H{head.head}" and str(head) == head.name


def test_a_head_id_is_its_layer_and_head_pair():
    """Tables key heads by (layer, head): a HeadId finds those keys and sorts as the pair does."""
    assert {(1, 2): "x"}[HeadId(1, 2)] == "x"
    assert sorted([HeadId(1, 0), HeadId(0, 3)]) == [(0, 3), (1, 0)]


@pytest.mark.parametrize("name", ["", "L3", "H5", "L3H", "l3h5", "L3H5.py", " L3H5", "L-1H2", "L3H5_c0", "LxHy", None])
def test_a_bad_head_name_is_a_one_line_error(name):
    with pytest.raises(ContractError, match="not a head name") as error:
        HeadId.parse(name)
    assert "\n" not in str(error.value)


LIBRARY = LibrarySummary(
    model="m", n_heads=2, n_candidates=10, pool_size=6, library_size=2, mean_val_iou=0.5, mean_test_iou=0.45,
    mean_synth_iou=0.55, unrestricted={"mean_val_iou": 0.6, "mean_test_iou": 0.5, "programs_used": 2},
    library_curve=[{"size": 1, "mean_val_iou": 0.4, "mean_test_iou": 0.35}], mean_terms=None,
    heads_per_program={"p": 2}, baselines={"uniform": 0.2}, per_layer_test_iou={"0": 0.45},
    n_causal_programs=6, splits={"synth": 3, "val": 3, "test": 3}, selection="a set cover")
CURVE = {"0": 0.0, "0.5": 0.2}
SUBSTITUTION = SubstitutionSummary(
    model="m", split="heldout", baseline_ppl=20.0, n_tokens=100, baseline_ppl_interval=[19.0, 21.0],
    best=HeadlineMethod(method="programs", chosen_on="val", rel_increase=CURVE, interval={"0": [0.0, 0.0]}),
    n_replaced={"0": 0, "0.5": 1},
    splits={"heldout": {"baseline_ppl": 20.0, "n_tokens": 100, "baseline_ppl_interval": [19.0, 21.0],
                        "programs": CURVE}},
    program_failures=0, single_head=SingleHeadStats(n_heads=3, iou="test_iou", spearman_rho=-0.5, p_value=0.4))
QA = QASummary(model="m", metrics={"piqa": "acc_norm"}, tasks={"piqa": {"programs": {"0": {"acc": 0.7}}}},
               results=[{"task": "piqa", "method": "programs", "fraction": 0, "acc": 0.7}], max_drop={"0.5": 0.1})
TRANSFER = TransferSummary(
    library_model="a", target_model="b", n_programs=2, n_heads=1, mean_test_iou=0.4, own_mean_test_iou=0.5,
    programs_used=1, universal_margin=0.05, universal_heads=0,
    programs=[TransferProgram(name="p", description="d", heads=1, universal_heads=0, mean_test_iou=0.4)],
    heads=[TransferHead(layer=0, head=1, program="p", val_iou=0.5, test_iou=0.4, own_program=None,
                        own_test_iou=0.5)],
    failed_examples={"val": {}, "test": {"p": 1}})
INFO = ModelInfo(model="m", load_path="/x", architecture="GPT2LMHeadModel", model_type="gpt2", n_layers=2,
                 n_heads=3, n_kv_heads=3, is_causal=True)
RECORDS = [LIBRARY, SUBSTITUTION, QA, TRANSFER, INFO]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_reads_back_what_was_written(record, tmp_path):
    record.write(tmp_path / "summary.json")
    assert type(record).read(tmp_path / "summary.json") == record


def test_the_substitution_summary_keeps_the_main_splits_curves_at_the_top_level(tmp_path):
    """The layout of runs before the record: each method's curve on the main split at the top level too."""
    SUBSTITUTION.write(tmp_path / "summary.json")
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["programs"] == CURVE and written["best"]["method"] == "programs"
    assert SUBSTITUTION.rel_increase("programs") == CURVE


# field, bad value: a missing field (None here) or one of the wrong type
MALFORMED = {
    "LibrarySummary": [("mean_test_iou", None), ("mean_test_iou", "0.4"), ("library_size", 2.5),
                       ("baselines", {"uniform": "high"}), ("library_curve", {"size": 1})],
    "SubstitutionSummary": [("split", None), ("baseline_ppl", "20"), ("best", {"method": "programs"}),
                            ("n_replaced", {"0": 0.5})],
    "QASummary": [("results", None), ("metrics", ["acc"]), ("max_drop", {"0.5": None})],
    "TransferSummary": [("heads", None), ("n_heads", True), ("programs", [{"name": "p"}])],
    "ModelInfo": [("n_layers", None), ("is_causal", "yes"), ("n_heads", "12")],
}


@pytest.mark.parametrize("record, field, value", [(r, f, v) for r in RECORDS for f, v in MALFORMED[type(r).__name__]],
                         ids=lambda x: type(x).__name__ if hasattr(x, "to_dict") else str(x))
def test_a_malformed_file_is_a_one_line_error_naming_file_and_field(record, field, value, tmp_path):
    data = record.to_dict()
    if value is None:
        del data[field]
    else:
        data[field] = value
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError) as error:
        type(record).read(path)
    message = str(error.value)
    assert str(path) in message and field in message and "\n" not in message, message


def test_a_missing_or_unparsable_file_is_named(tmp_path):
    with pytest.raises(ContractError, match="missing file .*summary.json"):
        LibrarySummary.read(tmp_path / "summary.json")
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ContractError, match="summary.json is not valid JSON"):
        LibrarySummary.read(tmp_path / "summary.json")
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(ContractError, match="summary.json: expected a JSON object"):
        LibrarySummary.read(tmp_path / "summary.json")


def test_fields_a_record_does_not_declare_are_ignored(tmp_path):
    """A file with more fields (a later version) still reads; optional fields may be absent (earlier runs)."""
    data = {**SUBSTITUTION.to_dict(), "something_new": 1}
    del data["single_head"], data["tuning"], data["program_failures"]
    (tmp_path / "summary.json").write_text(json.dumps(data))
    assert SubstitutionSummary.read(tmp_path / "summary.json") == replace(SUBSTITUTION, single_head=None)


def test_a_writer_of_the_wrong_type_fails_before_the_file_exists(tmp_path):
    with pytest.raises(ContractError, match=r"summary.json \(writing\): field library_size"):
        replace(LIBRARY, library_size="two").write(tmp_path / "summary.json")
    assert not (tmp_path / "summary.json").exists()


def test_a_manifest_reads_its_candidates_through_the_same_typed_check(tmp_path):
    """Manifests and rerank rows are read by the records' one reader: nested candidates become Candidate, and a
    wrong type in one names the manifest, the candidate and the field."""
    manifest = Manifest(model="tiny", layer=0, head=1, backend="offline",
                        candidates=[Candidate(name="L0H1_c0", file="L0H1_c0.py", origin="offline", n_terms=2)])
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["candidates"][0]["n_terms"] = "two"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ContractError, match=r"manifest.json: candidates\[0\]: field n_terms is \"two\" \(str\)"):
        Manifest.read(tmp_path)


def test_a_table_written_before_a_column_existed_is_named_with_what_to_rerun(tmp_path):
    """A sweep.parquet from before the sweep reported the KL: the reader names the missing column and the way
    out, rather than failing deep inside the report."""
    import pandas as pd

    from attnprog.contracts import SWEEP

    path = tmp_path / "sweep.parquet"
    old = pd.DataFrame([{"method": "random", "seed": 0, "fraction": 0.0, "n_replaced": 0, "split": "heldout",
                         "n_tokens": 10, "ppl": 2.0, "ppl_lo": 1.9, "ppl_hi": 2.1, "rel_increase": 0.0,
                         "rel_lo": 0.0, "rel_hi": 0.0}])
    old.to_parquet(path)
    with pytest.raises(ContractError, match=r"sweep: .*sweep.parquet has no column kl .*--forcerun"):
        SWEEP.read(path)
    SWEEP.write(old.assign(kl=0.0, kl_lo=0.0, kl_hi=0.0), path)
    assert SWEEP.read(path)["kl"].tolist() == [0.0]
