"""The program library of one model: every head's candidates pooled, deduplicated by behaviour, every
program scored on every head, and each head's best program chosen on val and reported on test.

A program written for one head often fits another better (METHOD.md), so selection is over the whole
pool. Selection uses val only; test is only reported. Only programs that pass the causality check may be
chosen (they are the ones substitution can use); programs that fail it stay in the library, marked.

Scoring is vectorised: each program runs once per example (its output does not depend on the head), and
`scoring.iou_table` turns a split into one pairwise L1-distance computation per example.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_dir, write_json, write_parquet
from .extract import layer_file, read_layer_attention
from .programs import Program
from .runner import check_causal, run_programs
from .rerank import load_candidate, read_manifest
from .scoring import BASELINES, baseline_matrices, iou_table, jsd_rows_flat, lower_triangle

SPLITS = ("synth", "val", "test")


# ---- gathering candidates ----

def gather_candidates(synthesis_dirs: dict[tuple[int, int], str | Path],
                      rerank_tables: dict[tuple[int, int], str | Path]) -> list[dict]:
    """Every candidate that ran on val, as {program, origin, layer, head, dir}: the ones rerank scored
    with status ok (a failed candidate cannot be the best of anything)."""
    out = []
    for (layer, head), folder in sorted(synthesis_dirs.items()):
        manifest = read_manifest(folder)
        table = pd.read_parquet(rerank_tables[(layer, head)])
        ok = set(table.loc[table["status"] == "ok", "name"])
        for candidate in manifest["candidates"]:
            if candidate.get("status", "ok") != "ok":
                continue
            for program in load_candidate(folder, candidate):
                if program.name in ok:
                    out.append({"program": program, "origin": candidate["origin"], "layer": layer, "head": head,
                                "dir": Path(folder), "file": candidate["file"]})
    return out


def run_on_split(programs: list[Program], examples: pd.DataFrame, tokenizer_dir=None) -> tuple[list, list]:
    """Run programs on one split's examples: (per example an array (P, d) of flattened outputs, statuses).
    A program that fails on an example gets an all-zero output there (it scores IoU 0)."""
    inputs = [(list(tokens), text) for tokens, text in zip(examples["tokens"], examples["text"])]
    runs = run_programs(programs, inputs, tokenizer_dir=tokenizer_dir)
    lengths = [len(t) for t, _ in inputs]
    flat = [np.zeros((len(programs), n * (n + 1) // 2), dtype=np.float32) for n in lengths]
    statuses = []
    for p, program in enumerate(programs):
        run = runs[program.name]
        statuses.append(run.status)
        for e, matrix in enumerate(run.matrices):
            if matrix is not None:
                flat[e][p] = lower_triangle(matrix)
    return flat, statuses


def behaviour_key(flat_outputs: list[np.ndarray], p: int, decimals: int = 3) -> str:
    """A hash of a program's val outputs rounded to `decimals`: equal keys = same behaviour."""
    digest = hashlib.sha1()
    for out in flat_outputs:
        digest.update(np.round(out[p].astype(np.float64), decimals).tobytes())
    return digest.hexdigest()


def deduplicate(candidates: list[dict], flat_val: list[np.ndarray], decimals: int = 3) -> list[int]:
    """Indexes of the candidates to keep: one per behaviour on val, the one with the shortest source."""
    keep: dict[str, int] = {}
    for i, candidate in enumerate(candidates):
        key = behaviour_key(flat_val, i, decimals)
        if key not in keep or len(candidate["program"].source) < len(candidates[keep[key]]["program"].source):
            keep[key] = i
    return sorted(keep.values())


# ---- categories: what kind of cue a program leans on most ----

CATEGORY_RULES = [  # (pattern in the strongest positive term or the docstring, category)
    (r"first_token|first token", "first token"),
    (r"induction|same_token|previous_occurrence|earlier copy", "token match"),
    (r"offset\(n, 0\)|itself", "self"),
    (r"offset\(n, [1-9]\)|previous token|i - [0-9]", "previous tokens"),
    (r"punctuation|sentence_end|most_recent|comma", "punctuation"),
    (r"word|sentence", "word/sentence structure"),
    (r"is_token|stopword|capitalized|is_number|determiner", "token identity"),
    (r"distance|position", "position"),
]


def category_of(program: Program) -> str:
    """A short label for the report: the kind of cue of the strongest positive term (offline programs) or
    the first matching cue in the docstring (other programs). Nearly every head parks attention on the
    first token, so that cue names the category only when a program has no other positive one."""
    terms = re.findall(r"score \+= ([0-9.eE+-]+) \* (.*)", program.source)
    positive = [(float(w), text) for w, text in terms if float(w) > 0]
    other = [(w, text) for w, text in positive if "first_token" not in text]
    text = max(other or positive)[1] if positive else program.docstring
    for pattern, category in CATEGORY_RULES:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return category
    return "other"


# ---- the whole library ----

def head_matrices(attention_dir: str | Path, heads: list[tuple[int, int]], examples: pd.DataFrame
                  ) -> list[np.ndarray]:
    """Per example of `examples` (in order), an array (H, d) of every head's flattened attention."""
    ids = [int(e) for e in examples["example_id"]]
    lengths = [len(t) for t in examples["tokens"]]
    out = [np.zeros((len(heads), n * (n + 1) // 2), dtype=np.float32) for n in lengths]
    index = {lh: k for k, lh in enumerate(heads)}
    for layer in sorted({l for l, _ in heads}):
        matrices = read_layer_attention(layer_file(attention_dir, layer))
        for (head, example_id), matrix in matrices.items():
            k = index.get((layer, head))
            if k is None or example_id not in ids:
                continue
            e = ids.index(example_id)
            if matrix.shape != (lengths[e], lengths[e]):
                raise ValueError(f"L{layer}H{head} example {example_id}: attention {matrix.shape}, "
                                 f"{lengths[e]} tokens")
            out[e][k] = lower_triangle(matrix)
    return out


def build_library(model: str, heads: list[tuple[int, int]], synthesis_dirs: dict, rerank_tables: dict,
                  attention_dir: str | Path, examples_path: str | Path, out_dir: str | Path,
                  settings: dict | None = None, tokenizer_dir=None, is_causal: bool = True) -> dict:
    """Write results/{model}/library/: programs/*.py, programs.parquet, scores.parquet, best.parquet,
    baselines.parquet, summary.json (see docs/ARCHITECTURE.md). Returns the summary."""
    settings = settings or {}
    out_dir = Path(out_dir)
    examples = pd.read_parquet(examples_path)
    split_examples = {s: examples[examples["split"] == s].sort_values("example_id").reset_index(drop=True)
                      for s in SPLITS}
    for split, part in split_examples.items():
        if part.empty:
            raise ValueError(f"library: no {split} examples in {examples_path}")

    candidates = gather_candidates(synthesis_dirs, rerank_tables)
    if not candidates:
        raise ValueError(f"library: no candidate of {model} ran successfully on val")
    n_candidates = len(candidates)
    programs = [c["program"] for c in candidates]
    flat_val, _ = run_on_split(programs, split_examples["val"], tokenizer_dir)
    keep = deduplicate(candidates, flat_val, settings.get("dedup_decimals", 3))
    candidates = [candidates[i] for i in keep]
    programs = [c["program"] for c in candidates]
    outputs = {"val": [f[keep] for f in flat_val]}
    outputs["test"], _ = run_on_split(programs, split_examples["test"], tokenizer_dir)

    check_examples = [(list(t), x) for t, x in zip(split_examples["val"]["tokens"], split_examples["val"]["text"])]
    causal = [bool(check_causal(p, check_examples, max_examples=settings.get("causal_check_examples", 2),
                                tokenizer_dir=tokenizer_dir)) if is_causal else True for p in programs]

    real = {s: head_matrices(attention_dir, heads, split_examples[s]) for s in SPLITS}
    iou = {s: iou_table(outputs[s], real[s]) for s in ("val", "test")}  # (programs, heads)

    # Best per head: highest val IoU among programs usable for substitution (causal ones).
    eligible = np.array(causal)
    if not eligible.any():
        raise ValueError(f"library: no program of {model} passed the causality check")
    val_masked = np.where(eligible[:, None], iou["val"], -np.inf)
    best_index = val_masked.argmax(axis=0)
    heads_idx = np.arange(len(heads))

    # On synth only the chosen programs are scored (how well a head's best program fits its fitting data).
    chosen_once, position = np.unique(best_index, return_inverse=True)
    outputs["synth"], _ = run_on_split([programs[i] for i in chosen_once], split_examples["synth"], tokenizer_dir)
    synth_iou = iou_table(outputs["synth"], real["synth"])[position, heads_idx]

    # JS distance for each head's top programs by val IoU (all pairs would cost a log per entry per pair).
    top_k = settings.get("jsd_top_k", 5)
    jsd = {s: np.full(iou[s].shape, np.nan) for s in ("val", "test")}
    synth_jsd = np.zeros(len(heads))
    lengths = {s: [len(t) for t in split_examples[s]["tokens"]] for s in SPLITS}

    def mean_jsd_of(split, rows, h):
        return np.mean([jsd_rows_flat(outputs[split][e][rows].astype(np.float64),
                                      real[split][e][h].astype(np.float64)[None, :], n)
                        for e, n in enumerate(lengths[split])], axis=0)

    for h in range(len(heads)):
        top = np.unique(np.append(np.argsort(-iou["val"][:, h])[:top_k], best_index[h]))
        for split in ("val", "test"):
            jsd[split][top, h] = mean_jsd_of(split, top, h)
        synth_jsd[h] = mean_jsd_of("synth", [position[h]], h)[0]

    names = [p.name for p in programs]
    layers_of = np.array([l for l, _ in heads], dtype="int32")
    head_numbers = np.array([h for _, h in heads], dtype="int32")
    scores = pd.concat([pd.DataFrame({
        "program": np.repeat(names, len(heads)), "layer": np.tile(layers_of, len(names)),
        "head": np.tile(head_numbers, len(names)), "split": s, "iou": iou[s].ravel(), "jsd": jsd[s].ravel()})
        for s in ("val", "test")] + [pd.DataFrame({
            "program": [names[i] for i in best_index], "layer": layers_of, "head": head_numbers, "split": "synth",
            "iou": synth_iou, "jsd": synth_jsd})], ignore_index=True)

    best = pd.DataFrame({
        "layer": layers_of, "head": head_numbers, "program": [names[i] for i in best_index],
        "val_iou": iou["val"][best_index, heads_idx], "test_iou": iou["test"][best_index, heads_idx],
        "synth_iou": synth_iou, "causal": [causal[i] for i in best_index]})

    baselines = baseline_table(heads, split_examples, real)

    table = pd.DataFrame({
        "name": names, "origin": [c["origin"] for c in candidates],
        "source_layer": np.array([c["layer"] for c in candidates], dtype="int32"),
        "source_head": np.array([c["head"] for c in candidates], dtype="int32"),
        "description": [p.description for p in programs], "category": [category_of(p) for p in programs],
        "causal": causal, "trusted": [p.trusted for p in programs]})

    per_layer = best.groupby("layer")["test_iou"].mean()
    summary = {
        "model": model, "n_heads": len(heads), "library_size": len(programs),
        "n_candidates": n_candidates,
        "mean_val_iou": float(best["val_iou"].mean()), "mean_test_iou": float(best["test_iou"].mean()),
        "mean_synth_iou": float(best["synth_iou"].mean()),
        "baselines": {b: float(baselines[(baselines["baseline"] == b) & (baselines["split"] == "test")]["iou"].mean())
                      for b in BASELINES},
        "per_layer_test_iou": {str(int(l)): float(v) for l, v in per_layer.items()},
        "n_causal_programs": int(sum(causal)),
        "splits": {s: len(split_examples[s]) for s in SPLITS},
        "selection": "each head's best program is chosen by val IoU among causal programs; test IoU is reported",
    }

    write_library(out_dir, candidates, table, scores, best, baselines, summary)
    return summary


def baseline_table(heads: list[tuple[int, int]], split_examples: dict, real: dict) -> pd.DataFrame:
    """Mean IoU of each baseline on each head, on val and test. Random baselines are seeded by example id,
    so every head sees the same random draw."""
    rows = []
    for split in ("val", "test"):
        ids = [int(e) for e in split_examples[split]["example_id"]]
        lengths = [len(t) for t in split_examples[split]["tokens"]]
        flat = []
        for example_id, n in zip(ids, lengths):
            matrices = baseline_matrices(n, seed=example_id)
            flat.append(np.stack([lower_triangle(matrices[b]) for b in BASELINES]))
        table = iou_table(flat, real[split])  # (baselines, heads)
        for b, name in enumerate(BASELINES):
            for h, (layer, head) in enumerate(heads):
                rows.append({"baseline": name, "layer": layer, "head": head, "split": split, "iou": table[b, h]})
    return pd.DataFrame(rows).astype({"layer": "int32", "head": "int32"})


def write_library(out_dir: Path, candidates: list[dict], table, scores, best, baselines, summary) -> None:
    with atomic_dir(out_dir / "programs") as folder:
        for c in candidates:
            source = c["dir"] / c["file"]
            target = Path(folder) / f"{c['program'].name.split('.')[0]}.py"
            if not target.exists():
                shutil.copyfile(source, target)
    write_parquet(table, out_dir / "programs.parquet")
    write_parquet(scores, out_dir / "scores.parquet")
    write_parquet(best, out_dir / "best.parquet")
    write_parquet(baselines, out_dir / "baselines.parquet")
    write_json(out_dir / "summary.json", summary)
