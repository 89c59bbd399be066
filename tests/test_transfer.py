"""Cross-model transfer: a library run on another model's token strings, scored against that model's heads."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnprog.contracts import BEST, PROGRAMS, HeadId, HeadInputs, ModelInfo, SplitExamples, TransferSummary
from attnprog.library.transfer import UNIVERSAL_MARGIN, transfer
from attnprog.matrices import pack

FIXTURES = Path(__file__).parent / "fixtures" / "programs"
SELF_TOKEN = '''"""Each token attends to itself."""
import numpy as np


def attention(tokens: list[str]) -> np.ndarray:
    return np.eye(len(tokens))
'''
SENTENCES = ["The cat sat on the mat .", "A dog ran to the park and back", "It rained all day long"]


def previous(n):
    m = np.zeros((n, n), np.float32)
    m[np.arange(n), np.maximum(np.arange(n) - 1, 0)] = 1
    return m


def first(n):
    m = np.zeros((n, n), np.float32)
    m[:, 0] = 1
    return m


def test_each_head_takes_the_best_program_of_the_other_library(tmp_path):
    # Library model A: two programs, previous token and the token itself.
    library = tmp_path / "A" / "programs"
    library.mkdir(parents=True)
    shutil.copy(FIXTURES / "previous_token.py", library / "previous_token.py")
    (library / "self_token.py").write_text(SELF_TOKEN)
    from attnprog.programs import load_programs
    loaded = {p.name: p for p in load_programs(library)}
    assert set(loaded) == {"previous_token", "self_token"}
    PROGRAMS.write(pd.DataFrame([{"name": name, "origin": "offline", "source_layer": 0, "source_head": 0,
                                  "description": loaded[name].description, "category": "positional",
                                  "causal": True, "trusted": True, "n_terms": 1, "source_chars": 10,
                                  "in_library": True, "library_rank": k} for k, name in enumerate(loaded)]),
                   tmp_path / "A" / "programs.parquet")
    # Target model B: head 0 attends to the previous token, head 1 to the first token, on its own tokens.
    splits = {s: SplitExamples(list(range(k * 3, k * 3 + 3)), [t.split() for t in SENTENCES], SENTENCES)
              for k, s in enumerate(("synth", "val", "test"))}
    heads = [HeadId(0, 0), HeadId(0, 1)]
    attention = {(h, s): np.concatenate([pack(f(len(t))) for t in part.tokens])
                 for s, part in splits.items() for h, f in zip(heads, (previous, first))}
    HeadInputs.write(tmp_path / "B_inputs.npz", splits, attention)
    BEST.write(pd.DataFrame({"layer": [0, 0], "head": [0, 1], "program": ["b_prev", "b_first"],
                             "val_iou": [1.0, 1.0], "test_iou": [1.0, 1.0], "synth_iou": [1.0, 1.0],
                             "causal": [True, True],
                             **{f"{s}_output_error": [None, None] for s in ("synth", "val", "test")}}),
               tmp_path / "B_best.parquet")
    ModelInfo("B", str(tmp_path), "X", "x", 1, 2, 2, True).write(tmp_path / "B_info.json")

    result = transfer(library, tmp_path / "A" / "programs.parquet", tmp_path / "B_inputs.npz",
                      tmp_path / "B_best.parquet", tmp_path / "B_info.json", "A")
    assert (result.library_model, result.target_model, result.n_heads) == ("A", "B", 2)
    by_head = {h.head_id: h for h in result.heads}
    assert by_head[HeadId(0, 0)].program == "previous_token"
    assert by_head[HeadId(0, 0)].test_iou == pytest.approx(1.0)
    # No program of A attends to the first token: head 1 is explained worse than by B's own program.
    # (previous token and self agree with the first token on row 0 and 1 resp. / row 0 only: previous wins)
    expected_first = np.mean([_iou(previous(len(t.split())), first(len(t.split()))) for t in SENTENCES])
    assert by_head[HeadId(0, 1)].test_iou == pytest.approx(expected_first, abs=1e-5)
    assert by_head[HeadId(0, 1)].test_iou < 1 - UNIVERSAL_MARGIN
    assert result.own_mean_test_iou == pytest.approx(1.0)
    assert result.mean_test_iou == pytest.approx((1 + expected_first) / 2, abs=1e-5)
    assert result.universal_heads == 1
    assert result.programs[0].name == "previous_token" and result.programs[0].universal_heads == 1
    result.write(tmp_path / "A_B.json")  # what the report reads back
    assert TransferSummary.read(tmp_path / "A_B.json") == result


def _iou(a, b):
    a, b = pack(a), pack(b)
    return np.minimum(a, b).sum() / np.maximum(a, b).sum()
