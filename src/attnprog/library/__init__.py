"""The program library of one model: every head's candidates pooled and deduplicated, every program scored
on every head, the library chosen as a small set cover, and each head's program chosen from it on val and
reported on test.

A program written for one head often fits another better (METHOD.md), so selection is over the whole
pool. Selection uses val only; test is only reported. Only programs that pass the causality check may be
chosen (they are the ones substitution can use); programs that fail it stay in the pool, marked. This
stage is arithmetic over what the per-head rerank jobs stored: it runs no program.

    pool.py     gather the rerank jobs' programs and outputs, deduplicate, score on every head (IoU, and
                the relative output error where extraction recorded value Grams)
    choice.py   the library as a set cover, each head's program within it, the size curve, by the measure
                `library.choose_by` names (val IoU by default, or val relative output error)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_dir
from ..contracts import (BASELINES, BEST, PROGRAMS, SCORES, SPLITS, HeadId, HeadInputs, LibrarySummary,
                         is_trusted)
from ..matrices import pack
from ..programs import programs_from_source
from ..scoring import BASELINE_NAMES, baseline_matrices, iou_table
from ..settings import LibrarySettings
from . import choice, pool as pooling


def build_library(model: str, heads: list[HeadId], synthesis_dirs: list, rerank_results: list, head_inputs, out_dir,
                  settings: LibrarySettings) -> LibrarySummary:
    """The `library` rule: write results/{model}/library/ (programs/, programs.parquet, scores.parquet,
    best.parquet, baselines.parquet, summary.json; see docs/ARCHITECTURE.md). Returns the summary.
    The i-th synthesis folder and rerank result belong to heads[i]."""
    inputs = HeadInputs(head_inputs)
    gathered = pooling.gather(rerank_results)
    pool = pooling.deduplicate(gathered, settings.dedup_decimals)
    real = pooling.real_attention(inputs, heads)
    iou = pooling.iou_tables(pool, real)                           # split -> (programs, heads)
    grams = pooling.value_grams(inputs, heads)
    error = pooling.output_error_tables(pool, real, grams) if grams is not None else None  # same, lower is better
    measure = choice.measure_tables(iou, error, settings.choose_by)
    tolerance, prefer_shorter = settings.margins
    table = describe(pool, synthesis_dirs, heads)

    eligible = table["causal"].to_numpy()
    if not eligible.any():
        raise ValueError(f"library: no program of {model} passed the causality check")
    length = table["n_terms"].fillna(table["source_chars"]).to_numpy(dtype=float)  # program size, for ties
    members = choice.cover(measure["val"], eligible, tolerance, length)
    chosen = choice.assign_heads(measure["val"], members, length, prefer_shorter)
    unrestricted = choice.assign_heads(measure["val"], list(np.flatnonzero(eligible)), length, prefer_shorter)
    table["in_library"] = False
    table.loc[members, "in_library"] = True
    table["library_rank"] = pd.array([None] * len(table), dtype="Int32")
    table.loc[members, "library_rank"] = np.arange(len(members))
    curve_order = choice.facility_order(measure["val"], eligible, length, max(choice.CURVE_SIZES))

    columns = np.arange(len(heads))
    reported = {"iou": iou, **({"output_error": error} if error is not None else {})}
    best = pd.DataFrame({"layer": [h.layer for h in heads], "head": [h.head for h in heads],
                         "program": table["name"].to_numpy()[chosen],
                         **{f"{s}_iou": iou[s][chosen, columns] for s in ("val", "test", "synth")},
                         "causal": eligible[chosen],
                         **{f"{s}_output_error": error[s][chosen, columns] if error is not None
                            else np.full(len(heads), np.nan) for s in ("val", "test", "synth")}})
    scores = score_rows(pool, real, iou, error, table, heads, chosen, settings.jsd_top_k)
    baselines = baseline_table(heads, inputs, real)
    curve = choice.size_curve(measure["val"], {m: {s: t[s] for s in ("val", "test")} for m, t in reported.items()},
                              curve_order, eligible, length, prefer_shorter)
    summary = summarise(model, heads, gathered, table, best, baselines, curve, reported, unrestricted, inputs,
                        settings)
    write_library(Path(out_dir), table, scores, best, baselines, summary)
    return summary


def describe(pool: pooling.Pool, synthesis_dirs: list, heads: list[HeadId]) -> pd.DataFrame:
    """programs.parquet's rows for the pool: where each program comes from and what it says it does."""
    folder_of = {head: Path(folder) for head, folder in zip(heads, synthesis_dirs)}
    rows = []
    for row in pool.table.itertuples():
        path = folder_of[HeadId(int(row.layer), int(row.head))] / row.file
        source = path.read_text()
        program = next(p for p in programs_from_source(source, path.stem, path=path) if p.name == row.name)
        rows.append({"name": row.name, "origin": row.origin, "source_layer": row.layer, "source_head": row.head,
                     "description": program.description,
                     "category": pooling.category_of(source, program.docstring), "causal": bool(row.causal),
                     "trusted": is_trusted(row.origin), "n_terms": row.n_terms, "source_chars": row.source_chars,
                     "file": str(path)})
    return pd.DataFrame(rows)


def score_rows(pool, real, iou, error, table, heads, chosen, top_k: int) -> pd.DataFrame:
    """scores.parquet: every program on every head on every split (IoU; relative output error where the value
    Grams were recorded, `error`, else null); the row JS distance only for each head's `top_k` programs by val
    IoU and its chosen one (a log per entry per pair would cost more than the rest)."""
    jsd = {s: np.full(iou[s].shape, np.nan) for s in SPLITS}
    for h in range(len(heads)):
        top = np.unique(np.append(np.argsort(-iou["val"][:, h])[:top_k], chosen[h]))
        for split in SPLITS:
            jsd[split][top, h] = pooling.jsd_of(pool, real, split, top, h)
    names = table["name"].to_numpy()
    layers = np.array([h.layer for h in heads], dtype="int32")
    numbers = np.array([h.head for h in heads], dtype="int32")
    return pd.concat([pd.DataFrame({"program": np.repeat(names, len(heads)), "layer": np.tile(layers, len(names)),
                                    "head": np.tile(numbers, len(names)), "split": s, "iou": iou[s].ravel(),
                                    "jsd": jsd[s].ravel(),
                                    "output_error": error[s].ravel() if error is not None
                                    else np.full(iou[s].size, np.nan)}) for s in SPLITS], ignore_index=True)


def baseline_table(heads: list[HeadId], inputs: HeadInputs, real: dict) -> pd.DataFrame:
    """Mean IoU of each baseline on each head, per split. Random baselines are seeded by example id, so every
    head sees the same random draw."""
    rows = []
    for split in SPLITS:
        examples = inputs.examples(split)
        flat = [np.stack([pack(m) for m in baseline_matrices(n, seed=e).values()])
                for e, n in zip(examples.example_ids, examples.lengths)]
        table = iou_table(flat, real[split])  # (baselines, heads)
        for b, name in enumerate(BASELINE_NAMES):
            for h, head in enumerate(heads):
                rows.append({"baseline": name, "layer": head.layer, "head": head.head, "split": split,
                             "iou": table[b, h]})
    return pd.DataFrame(rows)


def summarise(model, heads, gathered, table, best, baselines, curve, reported, unrestricted, inputs,
              settings: LibrarySettings) -> LibrarySummary:
    """summary.json. reported: {measure: {split: (programs, heads)}}: IoU, and the relative output error
    where the value Grams were recorded (then its means are reported too, whichever measure chose)."""
    columns = np.arange(len(heads))
    error = reported.get("output_error")
    tolerance, margin = settings.margins
    measure = "val relative output error (lower is better)" if settings.choose_by == "output" else "val IoU"
    library = table[table["in_library"]]
    test = baselines[baselines["split"] == "test"]
    heads_per_program = best["program"].value_counts()
    return LibrarySummary(
        model=model, n_heads=len(heads), n_candidates=len(gathered), pool_size=len(table),
        library_size=int(len(library)),
        mean_val_iou=float(best["val_iou"].mean()), mean_test_iou=float(best["test_iou"].mean()),
        mean_synth_iou=float(best["synth_iou"].mean()),
        choose_by=settings.choose_by,
        mean_val_output_error=_number(best["val_output_error"].mean()),
        mean_test_output_error=_number(best["test_output_error"].mean()),
        unrestricted={**{f"mean_{s}_{m}": float(t[s][unrestricted, columns].mean())
                         for m, t in reported.items() for s in ("val", "test")},
                      "programs_used": int(len(set(unrestricted)))},
        library_curve=curve,
        mean_terms=_number(table.set_index("name").loc[best["program"], "n_terms"].mean()),
        heads_per_program={name: int(count) for name, count in heads_per_program.items()},
        baselines={b: float(test[test["baseline"] == b]["iou"].mean()) for b in BASELINE_NAMES},
        per_layer_test_iou={str(int(l)): float(v) for l, v in best.groupby("layer")["test_iou"].mean().items()},
        n_causal_programs=int(table["causal"].sum()),
        splits={s: len(inputs.examples(s).example_ids) for s in SPLITS},
        selection=(f"greedy set cover of the causal programs until every head is within "
                   f"{tolerance} {measure} of the pool's best; each head takes the library program "
                   f"with the fewest terms within {margin} of the library's best on val; "
                   f"test IoU{' and relative output error are' if error is not None else ' is'} reported"),
    )


def _number(value) -> float | None:
    return None if pd.isna(value) else float(value)


def write_library(out_dir: Path, table: pd.DataFrame, scores, best, baselines, summary: LibrarySummary) -> None:
    """programs/ holds the library's files (the chosen programs only); the tables cover the whole pool."""
    with atomic_dir(out_dir / "programs") as folder:
        for path in dict.fromkeys(table.loc[table["in_library"], "file"]):
            shutil.copyfile(path, Path(folder) / Path(path).name)
    PROGRAMS.write(table.drop(columns=["file"]), out_dir / "programs.parquet")
    SCORES.write(scores, out_dir / "scores.parquet")
    BEST.write(best, out_dir / "best.parquet")
    BASELINES.write(baselines, out_dir / "baselines.parquet")
    summary.write(out_dir / "summary.json")
