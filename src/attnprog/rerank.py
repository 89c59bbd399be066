"""Rerank: score one head's candidate programs on the val split (soft IoU and row JS distance).

Candidates come from `results/{model}/synthesis/L{layer}H{head}/` (program files + manifest.json). Offline
candidates are trusted and run in-process; every other origin runs in the sandbox (`attnprog.programs`). A
candidate that failed synthesis or fails here scores worst: IoU 0, JS distance 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import write_parquet
from .extract import layer_file, read_head_attention
from .programs import ProgramError, load_programs, run_programs
from .scoring import mean_iou, mean_jsd

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


def rerank_head(candidates_dir: str | Path, attention_dir: str | Path, examples_path: str | Path, layer: int,
                head: int, out_path: str | Path, tokenizer_dir: str | Path | None = None,
                split: str = "val") -> pd.DataFrame:
    """Score every candidate of one head on `split` and write one row per program to out_path (Parquet)."""
    manifest = read_manifest(candidates_dir)
    examples = pd.read_parquet(examples_path)
    examples = examples[examples["split"] == split].sort_values("example_id")
    if examples.empty:
        raise ValueError(f"rerank: no examples in split '{split}' in {examples_path}")
    attention = read_head_attention(layer_file(attention_dir, layer), head)
    missing = sorted(set(examples["example_id"]) - set(attention))
    if missing:
        raise ValueError(f"rerank: no attention for L{layer}H{head} on {split} examples {missing[:5]}")
    real = [attention[int(e)] for e in examples["example_id"]]
    inputs = [(list(tokens), text) for tokens, text in zip(examples["tokens"], examples["text"])]

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
            if run.status == "ok":
                iou, jsd = mean_iou(run.matrices, real), mean_jsd(run.matrices, real)
            else:
                iou, jsd = 0.0, 1.0
            rows.append({**base, "name": program.name, "status": run.status, "error": run.error,
                         "val_iou": iou, "val_jsd": jsd})
    table = pd.DataFrame(rows, columns=COLUMNS).rename(columns={"val_iou": f"{split}_iou",
                                                                "val_jsd": f"{split}_jsd"})
    table = table.astype({"layer": "int32", "head": "int32"})
    write_parquet(table, out_path)
    return table
