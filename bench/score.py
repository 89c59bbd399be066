"""How long scoring every library program on every head on val takes (the library rule's main cost).

Usage: python bench/score.py [--results results/smollm2-135m] [--naive-pairs 40]

Needs a finished library (`snakemake results/<model>/library/summary.json`). Prints the vectorised time
(programs run once per example, then one pairwise L1 distance per example) broken into its parts, and the
time a naive per-token Python loop would take for the same IoU table (measured on a sample of
program-head pairs and scaled up). The last line is `score_all_heads_s: <seconds>` (vectorised).
"""
import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd

from attnprog.library import head_matrices, run_on_split
from attnprog.programs import load_programs
from attnprog.scoring import iou_table


def naive_iou(program_rows: list[np.ndarray], head_rows: list[np.ndarray], lengths: list[int]) -> float:
    """Soft IoU of one program against one head, averaged over examples, one token pair at a time."""
    total = 0.0
    for p, a, n in zip(program_rows, head_rows, lengths):
        low = high = 0.0
        k = 0
        for i in range(n):
            for _ in range(i + 1):
                x, y = float(p[k]), float(a[k])
                low += x if x < y else y
                high += y if x < y else x
                k += 1
        total += low / high
    return total / len(lengths)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/smollm2-135m", help="a model's results folder")
    parser.add_argument("--naive-pairs", type=int, default=40, help="program-head pairs timed with the naive loop")
    args = parser.parse_args()
    root = Path(args.results)
    if not (root / "library" / "summary.json").is_file():
        raise SystemExit(f"error: no library at {root / 'library'}; run the workflow up to it first")

    table = pd.read_parquet(root / "library" / "programs.parquet").set_index("name")
    programs = [p for p in load_programs(root / "library" / "programs") if p.name in table.index]
    programs = [load_programs(p.path, trusted=bool(table.loc[p.name, "trusted"]))[0] if p.kind == "tokens" else p
                for p in programs]
    info = json.loads((root / "model" / "info.json").read_text())
    heads = [(layer, head) for layer in range(info["n_layers"]) for head in range(info["n_heads"])]
    examples = pd.read_parquet(root / "data" / "examples.parquet")
    val = examples[examples["split"] == "val"].sort_values("example_id").reset_index(drop=True)
    lengths = [len(t) for t in val["tokens"]]
    print(f"{len(programs)} programs x {len(heads)} heads x {len(val)} val examples "
          f"({sum(n * (n + 1) // 2 for n in lengths)} attention entries per head)")

    start = time.perf_counter()
    outputs, _ = run_on_split(programs, val)
    run_s = time.perf_counter() - start
    start = time.perf_counter()
    real = head_matrices(root / "attention", heads, val)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    iou = iou_table(outputs, real)
    table_s = time.perf_counter() - start
    total = run_s + read_s + table_s
    print(f"run programs (once per example): {run_s:.2f} s")
    print(f"read every head's attention:      {read_s:.2f} s")
    print(f"IoU table (pairwise L1 per example): {table_s:.2f} s")

    rng = random.Random(0)
    pairs = [(rng.randrange(len(programs)), rng.randrange(len(heads))) for _ in range(args.naive_pairs)]
    start = time.perf_counter()
    for p, h in pairs:
        value = naive_iou([o[p] for o in outputs], [r[h] for r in real], lengths)
        assert abs(value - iou[p, h]) < 1e-4, "naive and vectorised IoU disagree"
    per_pair = (time.perf_counter() - start) / len(pairs)
    naive_total = run_s + read_s + per_pair * len(programs) * len(heads)
    print(f"naive per-token Python loop: {per_pair * 1e3:.1f} ms per program-head pair, "
          f"{naive_total:.0f} s for the whole table (scaled from {len(pairs)} pairs)")
    print(f"naive_score_all_heads_s: {naive_total:.1f}")
    print(f"score_all_heads_s: {total:.2f}")


if __name__ == "__main__":
    main()
