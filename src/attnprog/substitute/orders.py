"""Orders in which heads are replaced by their programs: each sweep method is one (`sweep.plan_sweep`).

- `programs`: descending val IoU of each head's program (the paper's order);
- `random`: the same programs in a seeded random head order (a baseline: what any order should beat).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def iou_order(best: pd.DataFrame, heads_with_programs) -> list[tuple[int, int]]:
    """Heads by descending val IoU of their program (ties: layer, head)."""
    ranked = best.sort_values(["val_iou", "layer", "head"], ascending=[False, True, True])
    return [(int(r.layer), int(r.head)) for r in ranked.itertuples() if (r.layer, r.head) in heads_with_programs]


def random_order(heads: list[tuple[int, int]], seed: int) -> list[tuple[int, int]]:
    return [heads[i] for i in np.random.default_rng(seed).permutation(len(heads))]
