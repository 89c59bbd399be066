"""How long scoring every pooled program on every head on val takes (the library rule's main cost).

Usage: python bench/score.py [--results results/smollm2-135m] [--naive-pairs 40]

Needs every head's rerank result (`snakemake results/<model>/library/summary.json`). Prints the vectorised
time (the stored outputs read, deduplicated, then one pairwise L1 distance per example) broken into its
parts, and the time a naive per-token Python loop would take for the same IoU table (measured on a sample of
program-head pairs and scaled up). The last line is `score_all_heads_s: <seconds>` (vectorised).
"""
import argparse
import random
import time
from pathlib import Path

import numpy as np

from attnprog.contracts import HeadInputs, ModelInfo
from attnprog.library import pool as pooling
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
    info = ModelInfo.read(root / "model" / "info.json")
    heads = info.heads
    results = [root / "rerank" / f"{head.name}.npz" for head in heads]
    if not all(path.is_file() for path in results):
        raise SystemExit(f"error: rerank results missing under {root / 'rerank'}; run the workflow up to them first")

    start = time.perf_counter()
    pool = pooling.deduplicate(pooling.gather(results))
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    inputs = HeadInputs(root / "synthesis" / "head_inputs.npz")
    real = pooling.real_attention(inputs, heads)
    outputs, real = pool.outputs["val"], real["val"]
    heads_s = time.perf_counter() - start
    lengths = inputs.examples("val").lengths
    print(f"{len(pool)} programs x {len(heads)} heads x {len(lengths)} val examples "
          f"({sum(n * (n + 1) // 2 for n in lengths)} attention entries per head)")
    start = time.perf_counter()
    iou = iou_table(outputs, real)
    table_s = time.perf_counter() - start
    total = read_s + heads_s + table_s
    print(f"read and deduplicate the stored outputs: {read_s:.2f} s")
    print(f"read every head's attention:             {heads_s:.2f} s")
    print(f"IoU table (pairwise L1 per example):     {table_s:.2f} s")

    rng = random.Random(0)
    pairs = [(rng.randrange(len(pool)), rng.randrange(len(heads))) for _ in range(args.naive_pairs)]
    start = time.perf_counter()
    for p, h in pairs:
        value = naive_iou([o[p] for o in outputs], [r[h] for r in real], lengths)
        assert abs(value - iou[p, h]) < 1e-4, "naive and vectorised IoU disagree"
    per_pair = (time.perf_counter() - start) / len(pairs)
    naive_total = read_s + heads_s + per_pair * len(pool) * len(heads)
    print(f"naive per-token Python loop: {per_pair * 1e3:.1f} ms per program-head pair, "
          f"{naive_total:.0f} s for the whole table (scaled from {len(pairs)} pairs)")
    print(f"naive_score_all_heads_s: {naive_total:.1f}")
    print(f"score_all_heads_s: {total:.2f}")


if __name__ == "__main__":
    main()
