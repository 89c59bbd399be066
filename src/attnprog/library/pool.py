"""The pool: every program that ran on its own head, gathered from the per-head rerank jobs, deduplicated by
behaviour, and scored on every head from the outputs those jobs stored (nothing runs again here).

A program's output does not depend on the head, so one stored output per (program, example) serves every
head: `scoring.iou_table` turns a split into one pairwise L1-distance computation per example, and, where
extraction recorded value Grams, `scoring.output_error_table` into a few matrix products per example.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ..contracts import SPLITS, HeadId, HeadInputs, RerankResult
from ..matrices import split_packed
from ..scoring import iou_table, jsd_rows_flat, output_error_table


@dataclass
class Pool:
    """The pooled programs (rows of `table`, in order) and their outputs per split: for each example, an
    array (P, d_e) of every program's packed output."""
    table: pd.DataFrame                  # rerank rows of the programs that ran: name, file, origin, layer, head, ...
    outputs: dict[str, list[np.ndarray]]

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, keep) -> "Pool":
        keep = np.asarray(keep)
        return Pool(self.table.iloc[keep].reset_index(drop=True), {s: [o[keep] for o in outs]
                                                                  for s, outs in self.outputs.items()})


def gather(rerank_results: list) -> Pool:
    """Every program that ran (status ok) on its own head, with its stored outputs."""
    rows, outputs, lengths = [], {s: [] for s in SPLITS}, {}
    for path in rerank_results:
        result = RerankResult.read(path)
        ok = [asdict(score) for score in result.scores if score.status == "ok"]
        if not ok:
            continue
        index = [result.names.index(row["name"]) for row in ok]
        for split in SPLITS:
            _, split_lengths, values, _ = result.splits[split]
            if split in lengths and list(lengths[split]) != list(split_lengths):
                raise ValueError(f"{path}: {split} examples differ from the other heads'")
            lengths[split] = split_lengths
            outputs[split].append(values[index])
        rows += ok
    if not rows:
        raise ValueError("no candidate program ran successfully on its head")
    table = pd.DataFrame(rows)
    duplicates = table["name"][table["name"].duplicated()].tolist()
    if duplicates:
        raise ValueError(f"program names occur for two heads: {duplicates[:3]}")
    return Pool(table, {s: split_packed(np.concatenate(outputs[s]), lengths[s]) for s in SPLITS})


def behaviour_key(per_example: list[np.ndarray], p: int, decimals: int = 3) -> str:
    """A hash of a program's outputs rounded to `decimals`: equal keys = the same behaviour."""
    digest = hashlib.sha1()
    for out in per_example:
        digest.update(np.round(out[p].astype(np.float64), decimals).tobytes())
    return digest.hexdigest()


def deduplicate(pool: Pool, decimals: int = 3) -> Pool:
    """One program per behaviour on val: the one with the shortest source."""
    keep: dict[str, int] = {}
    chars = pool.table["source_chars"].to_numpy()
    for p in range(len(pool)):
        key = behaviour_key(pool.outputs["val"], p, decimals)
        if key not in keep or chars[p] < chars[keep[key]]:
            keep[key] = p
    return pool.subset(sorted(keep.values()))


def real_attention(head_inputs: HeadInputs, heads: list[HeadId]) -> dict[str, list[np.ndarray]]:
    """Per split, per example, an array (H, d_e) of every head's packed attention."""
    out = {}
    for split in SPLITS:
        lengths = head_inputs.examples(split).lengths
        stacked = np.stack([head_inputs.attention(head, split) for head in heads])
        out[split] = split_packed(stacked, lengths)
    return out


def value_grams(head_inputs: HeadInputs, heads: list[HeadId]) -> dict[str, list[np.ndarray]] | None:
    """Per split, per example, an array (H, d_e) of every head's packed value Grams; None where extraction
    recorded none (synthesis.offline.objective other than output)."""
    if not head_inputs.has_value_grams:
        return None
    out = {}
    for split in SPLITS:
        lengths = head_inputs.examples(split).lengths
        out[split] = split_packed(np.stack([head_inputs.value_grams(head, split) for head in heads]), lengths)
    return out


def iou_tables(pool: Pool, real: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per split, the (programs, heads) table of mean soft IoU."""
    return {s: iou_table(pool.outputs[s], real[s]) for s in SPLITS}


def output_error_tables(pool: Pool, real: dict[str, list[np.ndarray]], grams: dict[str, list[np.ndarray]]
                        ) -> dict[str, np.ndarray]:
    """Per split, the (programs, heads) table of mean relative output error (lower is better)."""
    return {s: output_error_table(pool.outputs[s], real[s], grams[s]) for s in SPLITS}


def jsd_of(pool: Pool, real: dict, split: str, programs, head: int) -> np.ndarray:
    """Mean row Jensen-Shannon distance of some programs to one head on a split."""
    programs = np.asarray(programs)
    lengths = [int(round((np.sqrt(8 * r.shape[-1] + 1) - 1) / 2)) for r in real[split]]
    return np.mean([jsd_rows_flat(outs[programs].astype(np.float64), heads[head].astype(np.float64)[None], n)
                    for outs, heads, n in zip(pool.outputs[split], real[split], lengths)], axis=0)


# ---- categories: where a program's attention mostly goes, in one word ----

CATEGORY_RULES = [  # (pattern in a clause of the description, or in the docstring or source, category)
    (r"first_token|first token", "first token"),
    (r"induction|same_token|previous_occurrence|earlier cop", "token match"),
    (r"offset\(n, 0\)|itself", "self"),
    (r"offset\(n, [1-9]\)|previous token|i - [0-9]|tokens? \w+ back", "previous tokens"),
    (r"syntactic|noun_phrase|pos_is|part of speech|noun|verb", "syntax"),
    (r"punctuation|sentence_end|sentence end|most_recent|comma", "punctuation"),
    (r"function word|stopword|capitalized|is_number|numbers|determiner|is_token|'[^']+'", "token identity"),
    (r"word|sentence|clause", "word/sentence structure"),
    (r"distance|position|nearby|far-back", "position"),
    (r"spread", "diffuse"),
]
FIRST_TOKEN_CLAUSE = re.compile(r"\bthe first token\b(?!s)", flags=re.IGNORECASE)


def category_of(source: str, docstring: str) -> str:
    """A short label for the report: the kind of cue named first in the program's description (the
    docstring's first line; an offline program's sentence names where its attention goes, largest share
    first), else the first matching cue in the docstring, else in the source. Nearly every head parks
    attention on the first token, so that cue names the category only when the description names no other."""
    lines = docstring.strip().splitlines()
    clauses = [c for c in lines[0].split(";") if c.strip()] if lines else []
    others = [c for c in clauses if not FIRST_TOKEN_CLAUSE.search(c)]
    for text in others + clauses + [docstring, source]:
        for pattern, category in CATEGORY_RULES:
            if re.search(pattern, text, flags=re.IGNORECASE):
                return category
    return "other"
