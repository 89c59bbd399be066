"""Orders in which heads are replaced by their programs: each sweep method is one (`sweep.plan_sweep`).

- `programs`: descending val IoU of each head's program (the paper's order);
- `attribution`: cheapest estimated KL first, given the heads already chosen (`attribution.py`);
- `random`: the same programs in a seeded random head order (a baseline: what any order should beat).

All of them are written to orders.parquet (the ORDERS contract); QA replaces heads in the headline order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..contracts import ORDERS, ContractError, HeadId


def iou_order(best: pd.DataFrame, heads_with_programs) -> list[HeadId]:
    """Heads by descending val IoU of their program (ties: layer, head)."""
    ranked = best.sort_values(["val_iou", "layer", "head"], ascending=[False, True, True])
    return [HeadId(int(r.layer), int(r.head)) for r in ranked.itertuples() if (r.layer, r.head) in heads_with_programs]


def random_order(heads: list[HeadId], seed: int) -> list[HeadId]:
    return [heads[i] for i in np.random.default_rng(seed).permutation(len(heads))]


def orders_table(orders: dict[tuple[str, int | None], list[HeadId]], headline: str) -> list[dict]:
    """The ORDERS rows of the sweep's orders, keyed (method, seed)."""
    return [{"method": method, "seed": seed, "rank": rank, "layer": layer, "head": head, "headline": method == headline}
            for (method, seed), order in orders.items() for rank, (layer, head) in enumerate(order)]


def read_headline_order(path) -> tuple[str, list[HeadId]]:
    """(method, heads in replacement order) of the headline order in orders.parquet."""
    table = ORDERS.read(path)
    table = table[table.headline].sort_values("rank")
    if table.empty:
        raise ContractError(f"orders: {path} marks no headline order")
    return str(table.method.iloc[0]), [HeadId(int(r.layer), int(r.head)) for r in table.itertuples()]


def read_order(path, method: str) -> list[HeadId]:
    """Heads in replacement order of one method's order in orders.parquet (a method with one order: not random,
    which has one per seed)."""
    table = ORDERS.read(path)
    table = table[table.method == method].sort_values("rank")
    if table.empty or table["rank"].duplicated().any():
        raise ContractError(f"orders: {path} has {'no' if table.empty else 'more than one'} {method} order")
    return [HeadId(int(r.layer), int(r.head)) for r in table.itertuples()]
