"""One plain-English sentence for a fitted program: where the head looks, derived from the program's own terms.

A term with a positive weight on an indicator pulls attention to where the indicator is 1 (its *target*:
"the previous token"); a conditional term narrows or widens that pull ("the first token, less so when the
current token is punctuation"); a graded term (distance) tilts what is left ("nearby tokens"). Which
targets matter, and in what order, comes from the fitted program's own attention on the synth split: each
entry's attention is credited to the term that contributes most to its score, and a target's share is the
mean fraction of a row's attention credited to it, over the rows where the target exists. So the sentence
names what the program does, not just its largest weight:

    "Mostly the first token, less so when the current token is punctuation; often the previous token;
     sometimes earlier copies of the current token."
"""
from __future__ import annotations

import numpy as np

from .fit import row_softmax
from .primitives import Feature

QUANTIFIERS = ((0.5, "mostly"), (0.25, "often"), (0.1, "sometimes"))  # share of the row's attention, when present
MIN_MASS = 0.03          # a target shows only if it takes at least this share of all attention
MAX_CLAUSES = 4
MAX_CONDITIONS = 2       # per target
MIN_SPREAD = 0.2         # attention credited to no positive term, above which "otherwise spread ..." shows
MIN_EFFECT = 1.0         # a condition or tilt shows if it moves a score by this much (a factor e in attention)
AVOID_EFFECT = -3.0      # an unconditional negative term this strong, on a common target, is said ("avoids commas")


def quantifier(share: float) -> str | None:
    return next((word for limit, word in QUANTIFIERS if share >= limit), None)


def attention_shares(X: np.ndarray, weights: np.ndarray, row_starts: np.ndarray, cues: list[Feature]):
    """Credit the program's attention softmax(X w) to its terms. X: (D, k) the chosen primitives on the
    synth split (rows of the lower triangles stacked), weights (k,), row_starts: where each row begins.

    Returns (per target: (mass, share_when_present, present), spread) where mass is the mean share of a row's
    attention credited to the target's terms, share_when_present the same over the rows where the target
    exists, present the fraction of rows where it does, and spread the share credited to no positive term."""
    X = np.asarray(X, dtype=np.float64)
    n_rows = len(row_starts)
    p = row_softmax(X @ weights, row_starts)
    contribution = X * weights
    has_target = np.array([bool(c.target) for c in cues])
    contribution[:, ~has_target] = 0.0
    top = np.argmax(contribution, axis=1)
    credited = contribution[np.arange(len(p)), top] > 0
    out = {}
    for target in dict.fromkeys(c.target for c in cues if c.target):
        mine = np.array([c.target == target for c in cues])
        mass_per_row = np.add.reduceat(np.where(credited & mine[top], p, 0.0), row_starts)
        present = np.add.reduceat((X[:, mine] != 0).any(axis=1).astype(float), row_starts) > 0
        when = float(mass_per_row[present].mean()) if present.any() else 0.0
        out[target] = (float(mass_per_row.sum() / n_rows), when, float(present.mean()))
    spread = float(np.add.reduceat(np.where(credited, 0.0, p), row_starts).sum() / n_rows)
    return out, spread


def _join(conditions: list[str]) -> str:
    """'when the current token is punctuation' + 'when the current token is a function word' ->
    'when the current token is punctuation or a function word'."""
    if len(conditions) < 2:
        return "".join(conditions)
    if any(" and " in c for c in conditions):  # compound conditions: sharing words would blur them
        return " or ".join(conditions)
    words = [c.split() for c in conditions]
    common = 0
    while all(len(w) > common + 1 and w[common] == words[0][common] for w in words):
        common += 1
    if common >= 2:
        return " ".join(words[0][:common]) + " " + " or ".join(" ".join(w[common:]) for w in words)
    return " or ".join(conditions)


def _target_clause(target: str, share_when: float, present: float, terms: list[tuple[Feature, float]]) -> str:
    """'often the first token, less so when the current token is punctuation'. terms: (cue, effect) of
    the program's terms, effect = weight times the cue's typical size where it is on. At most
    MAX_CONDITIONS conditions are said, the strongest."""
    conditions = sorted(((c.condition, e) for c, e in terms if c.target == target and c.condition
                         and abs(e) >= MIN_EFFECT), key=lambda ce: -abs(ce[1]))[:MAX_CONDITIONS]
    plain = any(c.target == target and not c.condition and e >= MIN_EFFECT for c, e in terms)
    narrowing = [cond for cond, e in conditions if e > 0]
    text = target
    if narrowing and not plain:  # the target pulls only under its conditions
        text += " " + _join(narrowing)
    elif narrowing:
        text += ", especially " + _join(narrowing)
    elif present < 0.9:
        text += ", when present"
    weakening = [cond for cond, e in conditions if e < 0]
    if weakening:
        text += ", less so " + _join(weakening)
    return f"{quantifier(share_when)} {text}"


def program_sentence(X: np.ndarray, weights, row_starts: np.ndarray, cues: list[Feature]) -> str:
    """One sentence saying where the program's attention goes (see the module docstring)."""
    X, weights = np.asarray(X, dtype=np.float64), np.asarray(weights, dtype=float)
    shares, spread = attention_shares(X, weights, row_starts, cues)
    size = [float(np.abs(X[X[:, k] != 0, k]).mean()) if (X[:, k] != 0).any() else 0.0 for k in range(X.shape[1])]
    terms = [(c, w * z) for c, w, z in zip(cues, weights, size)]
    clauses = []  # (mass, text)
    for target, (mass, when, present) in sorted(shares.items(), key=lambda kv: -kv[1][0]):
        if mass >= MIN_MASS and quantifier(when) and len(clauses) < MAX_CLAUSES:
            clauses.append((mass, _target_clause(target, when, present, terms)))
    if spread >= MIN_SPREAD or not clauses:
        tilt = [(abs(e), c.more if e > 0 else c.less) for c, e in terms
                if not c.target and (c.more or c.less) and abs(e) >= MIN_EFFECT]
        text = "spread over the text" + (f", favouring {max(tilt)[1]}" if tilt else "")
        clauses.append((spread, f"{quantifier(spread)} {text}" if clauses and quantifier(spread) else text))
    clauses.sort(key=lambda c: -c[0])
    avoided = [(e, c.target) for c, e in terms if c.target and not c.condition and e <= AVOID_EFFECT
               and shares[c.target][2] >= 0.5]
    sentence = "; ".join(text for _, text in clauses) + (f"; avoids {min(avoided)[1]}" if avoided else "")
    return sentence[0].upper() + sentence[1:] + "."
