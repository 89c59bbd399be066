"""Rerank: score one head's candidate programs on the val split (soft IoU and row JS distance).

Candidates come from `results/{model}/synthesis/L{layer}H{head}/` (program files + manifest.json), the val
examples and the head's attention from the per-model `head_inputs` file (so a job imports little). Offline
candidates are trusted and run in-process; every other origin runs in the sandbox (`attnprog.programs`). A
candidate that failed synthesis or fails here scores worst: IoU 0, JS distance 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path
from .programs import ProgramError, load_programs
from .runner import run_programs
from .scoring import mean_iou, mean_jsd
from .synthesize import read_head_inputs

COLUMNS = ["layer", "head", "name", "file", "origin", "status", "error", "val_iou", "val_jsd", "synth_jsd"]


def tokenizer_dir_of(info: dict) -> str | None:
    """The model's local folder (for reference-signature programs, which tokenise themselves), if it has one."""
    path = Path(str(info.get("load_path", "")))
    return str(path) if path.is_dir() else None


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {folder}")
    return json.loads(path.read_text())


def load_candidate(folder: str | Path, candidate: dict):
    """The Program objects of one manifest entry (several for a reference-signature file)."""
    return load_programs(Path(folder) / candidate["file"], trusted=candidate["origin"] == "offline")


def rerank_head(candidates_dir: str | Path, head_inputs: str | Path, layer: int, head: int,
                out_path: str | Path, tokenizer_dir: str | Path | None = None, split: str = "val") -> list[dict]:
    """Score every candidate of one head on `split`; write one row per program to out_path (Parquet)."""
    manifest = read_manifest(candidates_dir)
    examples = read_head_inputs(head_inputs, layer, head, split)
    real = examples.matrices
    inputs = list(zip(examples.tokens, examples.texts))

    rows = []
    for candidate in manifest["candidates"]:
        base = {"layer": layer, "head": head, "file": candidate.get("file"), "origin": candidate["origin"],
                "synth_jsd": candidate.get("synth_jsd")}
        programs, status, error = [], candidate.get("status", "ok"), candidate.get("error")
        if status == "ok":
            try:
                programs = load_candidate(candidates_dir, candidate)
            except (ProgramError, FileNotFoundError) as e:
                status, error = getattr(e, "status", "missing"), str(e)
        if not programs:
            rows.append({**base, "name": candidate["name"], "status": status, "error": error,
                         "val_iou": 0.0, "val_jsd": 1.0})
            continue
        runs = run_programs(programs, inputs, tokenizer_dir=tokenizer_dir)
        for program in programs:
            run = runs[program.name]
            ok = run.status == "ok"
            rows.append({**base, "name": program.name, "status": run.status, "error": run.error,
                         "val_iou": mean_iou(run.matrices, real) if ok else 0.0,
                         "val_jsd": mean_jsd(run.matrices, real) if ok else 1.0})
    columns = {c: [r[c] for r in rows] for c in COLUMNS}
    types = {"layer": pa.int32(), "head": pa.int32(), "val_iou": pa.float64(), "val_jsd": pa.float64(),
             "synth_jsd": pa.float64()}
    table = pa.table({c.replace("val_", f"{split}_"): pa.array(v, type=types.get(c, pa.string()))
                      for c, v in columns.items()})
    with atomic_path(out_path) as tmp:  # pyarrow alone: pandas would double this job's start-up time
        pq.write_table(table, tmp)
    return rows
