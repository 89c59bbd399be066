"""The paired comparison of two runs of one QA task on the same questions (a substituted model against the
unmodified one): what changed, the accuracy difference with a 95% interval, and McNemar's exact test."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def paired_comparison(before: Sequence[float], after: Sequence[float],
                      answers_before: Sequence | None = None, answers_after: Sequence | None = None) -> dict:
    """`after` against `before`, question by question (1 = answered correctly, 0 = not; same order).

    - n_better / n_worse: questions wrong before and right after / right before and wrong after;
    - n_changed: questions whose chosen answer changed (None when either run's answers are unknown);
    - diff: accuracy after - accuracy before, with diff_lo / diff_hi its 95% interval by the normal
      approximation of the mean paired difference (d_i = after_i - before_i, standard error sd(d) / sqrt(n));
      no interval (None) under two questions;
    - mcnemar_p: McNemar's exact test, the two-sided binomial test of n_better among the discordant pairs
      (1.0 when there are none).
    """
    from scipy.stats import binomtest

    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"paired comparison needs two runs on the same questions ({before.shape} vs {after.shape})")
    n = len(before)
    d = after - before
    better, worse = int(np.sum((before == 0) & (after == 1))), int(np.sum((before == 1) & (after == 0)))
    diff = float(d.mean()) if n else math.nan
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(n) if n >= 2 else math.nan
    changed = None
    if answers_before is not None and answers_after is not None \
            and not any(a is None for a in (*answers_before, *answers_after)):
        changed = int(sum(a != b for a, b in zip(answers_before, answers_after, strict=True)))
    return {"n_changed": changed, "n_better": better, "n_worse": worse, "diff": _number(diff),
            "diff_lo": _number(diff - half), "diff_hi": _number(diff + half),
            "mcnemar_p": float(binomtest(better, better + worse, 0.5).pvalue) if better + worse else 1.0}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
