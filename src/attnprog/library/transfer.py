"""Cross-model transfer: how much of model B one model A's library explains.

Programs see only token strings, so A's library runs on B's examples as they are (B's tokenizer, B's token
strings). Each of B's heads takes the A program with the best val IoU on it, reported on test, beside the test
IoU of its own program from B's library. The programs run once here (trusted offline ones in-process, the rest
in the sandbox, as everywhere); B's attention comes from B's stored head inputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ..contracts import (BEST, PROGRAMS, HeadId, HeadInputs, ModelInfo, TransferHead, TransferProgram,
                         TransferSummary)
from ..matrices import pack
from ..programs import load_programs
from ..runner import run_programs
from ..scoring import iou_table

SPLITS = ("val", "test")  # val chooses each head's program, test reports it
# An A program is "universal" on B where it is some head's choice there and explains that head within this
# much test IoU of B's own program for it.
UNIVERSAL_MARGIN = 0.05


def library_programs(program_dir, programs_path) -> list:
    """The library's programs (in_library), each trusted as its row of programs.parquet says."""
    table = PROGRAMS.read(programs_path).set_index("name")
    loaded = {p.name: p for p in load_programs(program_dir)}
    names = sorted(table.index[table["in_library"]])
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"transfer: library programs {missing[:3]} are not in {program_dir}")
    return [dataclasses.replace(loaded[n], trusted=bool(table.loc[n, "trusted"])) for n in names]


def _packed(matrix, n: int) -> np.ndarray:
    """A program's matrix as a packed lower triangle; a failed example scores worst (IoU 0 against any head)."""
    return np.zeros(n * (n + 1) // 2, dtype=np.float32) if matrix is None else pack(np.asarray(matrix, np.float32))


def transfer(program_dir, programs_path, head_inputs_path, best_path, target_info_path,
             library_model: str) -> TransferSummary:
    """The transfer of `library_model`'s library onto the target model (its head inputs and best.parquet)."""
    target = ModelInfo.read(target_info_path)
    programs = library_programs(program_dir, programs_path)
    inputs = HeadInputs(head_inputs_path)
    own = BEST.read(best_path).set_index(["layer", "head"])
    heads = [HeadId(int(layer), int(head)) for layer, head in own.index]
    ious, failures = {}, {}
    for split in SPLITS:
        part = inputs.examples(split)
        runs = run_programs(programs, part.calls(), tokenizer_dir=target.tokenizer_dir)
        failures[split] = {p.name: runs[p.name].n_failed for p in programs if runs[p.name].n_failed}
        predicted = [np.stack([_packed(runs[p.name].matrices[e], n) for p in programs])
                     for e, n in enumerate(part.lengths)]
        bounds = np.cumsum([0] + [n * (n + 1) // 2 for n in part.lengths])
        stacked = np.stack([inputs.attention(head, split) for head in heads])
        actual = [stacked[:, bounds[e]:bounds[e + 1]] for e in range(len(part.lengths))]
        ious[split] = iou_table(predicted, actual)  # (programs, heads)
    choice = ious["val"].argmax(axis=0)
    rows = []
    for k, head in enumerate(heads):
        mine = own.loc[(head.layer, head.head)]
        rows.append(TransferHead(layer=head.layer, head=head.head, program=programs[choice[k]].name,
                                 val_iou=float(ious["val"][choice[k], k]), test_iou=float(ious["test"][choice[k], k]),
                                 own_program=mine["program"] if isinstance(mine["program"], str) else None,
                                 own_test_iou=float(mine["test_iou"])))
    table = pd.DataFrame([dataclasses.asdict(row) for row in rows])
    table["universal"] = table["test_iou"] >= table["own_test_iou"] - UNIVERSAL_MARGIN
    by_program = (table.groupby("program")
                  .agg(heads=("head", "size"), universal_heads=("universal", "sum"), mean_test_iou=("test_iou", "mean"))
                  .sort_values(["universal_heads", "heads"], ascending=False).reset_index())
    descriptions = {p.name: p.description for p in programs}
    return TransferSummary(
        library_model=library_model, target_model=target.model, n_programs=len(programs), n_heads=len(heads),
        mean_test_iou=float(table["test_iou"].mean()),          # B's heads under A's library
        own_mean_test_iou=float(table["own_test_iou"].mean()),  # B's heads under B's own library
        programs_used=int(table["program"].nunique()),
        universal_margin=UNIVERSAL_MARGIN,
        universal_heads=int(table["universal"].sum()),
        programs=[TransferProgram(name=r.program, description=descriptions.get(r.program, ""), heads=int(r.heads),
                                  universal_heads=int(r.universal_heads), mean_test_iou=float(r.mean_test_iou))
                  for r in by_program.itertuples()],
        heads=rows,
        failed_examples=failures,
    )
