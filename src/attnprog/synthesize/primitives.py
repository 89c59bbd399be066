"""The offline synthesizer's primitives: readable causal cues over `attnprog.helpers`.

Each primitive is one expression over the helpers (as `h`), `tokens` and `n` that gives an n x n matrix;
the emitted program runs exactly that expression, so what was fitted is what runs. Once per model,
`compute_features` (rule `synth_features`) evaluates every primitive on every synth and val example, so each
per-head job only loads an array.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import helpers
from ..atomic import atomic_path
from ..matrices import pack

SPLITS_USED = ("synth", "val")


@dataclass(frozen=True)
class Feature:
    name: str
    expression: str  # numpy / helpers (as `h`) code over `tokens` and `n`, giving an n x n matrix
    description: str  # plain English: what [i, j] is
    # For the program's sentence (sentence.py): where token i looks when the cue is on, and when it applies;
    # graded cues have no target but say what a positive / negative weight favours, and their condition is
    # how they read when they scale another cue ("the further back it is").
    target: str = ""
    condition: str = ""
    more: str = ""
    less: str = ""


FEATURE_FIELDS = ("name", "expression", "description", "target", "condition", "more", "less")
CURRENT_IS_PUNCTUATION = "when the current token is punctuation"
FAR, NEAR = "far-back tokens", "nearby tokens"
FURTHER_BACK, LATER = "the further back it is", "the later it is in the text"

FEATURES = [
    Feature("first", "h.first_token(n)", "j is the first token", "the first token"),
    Feature("first_log_position", "h.first_token(n) * h.log_position(n)",
            "j is the first token, times log(1 + i) (a pull to the first token that grows along the text)",
            "the first token", "further into the text"),
    Feature("self", "h.offset(n, 0)", "j is the token itself", "the current token itself"),
    Feature("previous", "h.offset(n, 1)", "j is the previous token (j = i - 1)", "the previous token"),
    Feature("back_2", "h.offset(n, 2)", "j = i - 2", "the token two back"),
    Feature("back_3", "h.offset(n, 3)", "j = i - 3", "the token three back"),
    Feature("back_4", "h.offset(n, 4)", "j = i - 4", "the token four back"),
    Feature("log_distance", "h.log_distance(n)", "log(1 + i - j), how far back j is", "", FURTHER_BACK, FAR, NEAR),
    Feature("distance", "h.distance(n)", "i - j, how many tokens back j is", "", FURTHER_BACK, FAR, NEAR),
    Feature("second", "h.key_is(h.positions(tokens) == 1)", "j is the second token", "the second token"),
    Feature("third", "h.key_is(h.positions(tokens) == 2)", "j is the third token", "the third token"),
    Feature("key_first_occurrence", "h.key_is(h.is_first_occurrence(tokens))",
            "token j is the first of its kind in the text", "tokens new to the text"),
    Feature("log_key_position", "np.log1p(h.key_is(h.positions(tokens)))", "log(1 + j), how far into the text j is",
            "", LATER, "later tokens", "early tokens"),
    Feature("key_punctuation", "h.key_is(h.is_punctuation(tokens))", "token j is punctuation", "punctuation"),
    Feature("key_sentence_end", "h.key_is(h.is_sentence_end(tokens))", "token j ends a sentence", "sentence ends"),
    Feature("key_comma", "h.key_is(h.is_token(tokens, ','))", "token j is a comma", "commas"),
    Feature("key_stopword", "h.key_is(h.is_stopword(tokens))", "token j is a function word (the, and, of, ...)",
            "function words"),
    Feature("key_capitalized", "h.key_is(h.is_capitalized(tokens))", "token j is capitalized", "capitalized tokens"),
    Feature("key_number", "h.key_is(h.is_number(tokens))", "token j is a number", "numbers"),
    Feature("key_word_start", "h.key_is(h.is_word_start(tokens))", "token j starts a word", "the first tokens of words"),
    Feature("key_determiner", "h.key_is(h.is_token(tokens, 'the', 'a', 'an'))", "token j is 'the', 'a' or 'an'",
            "'the', 'a' and 'an'"),
    Feature("same_token", "h.same_token(tokens)", "token j is an earlier copy of token i",
            "earlier copies of the current token"),
    Feature("induction", "h.induction(tokens)", "token j follows an earlier copy of token i (induction)",
            "the tokens after earlier copies of the current token"),
    Feature("previous_occurrence", "h.previous_occurrence_matrix(tokens)",
            "j is the most recent earlier copy of token i", "the latest earlier copy of the current token"),
    Feature("same_word", "h.same_word(tokens)", "j is in the same word as i", "the current word"),
    Feature("same_sentence", "h.same_sentence(tokens)", "j is in the same sentence as i", "the current sentence"),
    Feature("start_of_word", "h.start_of_word(tokens)", "j is the first token of i's word",
            "the start of the current word"),
    Feature("start_of_sentence", "h.start_of_sentence(tokens)", "j is the first token of i's sentence",
            "the start of the current sentence"),
    Feature("previous_word", "h.previous_word(tokens)", "j is in the word before i's word", "the previous word"),
    Feature("last_punctuation", "h.most_recent(h.is_punctuation(tokens))", "j is the last punctuation up to i",
            "the last punctuation mark"),
    Feature("last_sentence_end", "h.most_recent(h.is_sentence_end(tokens))",
            "j is the last sentence end up to i", "the last sentence end"),
    Feature("self_if_punctuation", "h.offset(n, 0) * h.query_is(h.is_punctuation(tokens))",
            "j is i itself and i is punctuation", "the current token itself", "when it is punctuation"),
    Feature("self_if_word_start", "h.offset(n, 0) * h.query_is(h.is_word_start(tokens))",
            "j is i itself and i starts a word", "the current token itself", "when it starts a word"),
    Feature("previous_if_inside_word", "h.offset(n, 1) * h.query_is(~h.is_word_start(tokens))",
            "j is the previous token and i continues a word", "the previous token",
            "when the current token is inside a word"),
    Feature("previous_if_punctuation", "h.offset(n, 1) * h.key_is(h.is_punctuation(tokens))",
            "j is the previous token and j is punctuation", "the previous token", "when that is punctuation"),
    Feature("first_if_punctuation", "h.first_token(n) * h.query_is(h.is_punctuation(tokens))",
            "j is the first token and i is punctuation", "the first token", CURRENT_IS_PUNCTUATION),
    Feature("first_if_stopword", "h.first_token(n) * h.query_is(h.is_stopword(tokens))",
            "j is the first token and i is a function word", "the first token",
            "when the current token is a function word"),
]


# Content-dependent cues from a spaCy parse of each prefix (the helpers' linguistic section). Not in the
# offline vocabulary: parsing every prefix costs about n^2 / 2 words per example. bench/tuning.py --extra-cues
# adds them to tuned programs, to ask whether attention that the cues above cannot express limits tuning.
LINGUISTIC_FEATURES = [
    Feature("syntactic_head", "h.syntactic_head(tokens)", "j holds the syntactic head of i",
            "the current token's syntactic head"),
    Feature("syntactic_dependents", "h.syntactic_dependents(tokens)", "j holds a syntactic dependent of i",
            "the current token's syntactic dependents"),
    Feature("same_noun_phrase", "h.same_noun_phrase(tokens)", "j is in i's noun phrase", "the current noun phrase"),
    Feature("key_noun", "h.key_pos_is(tokens, 'NOUN', 'PROPN')", "token j is a noun", "nouns"),
    Feature("key_verb", "h.key_pos_is(tokens, 'VERB', 'AUX')", "token j is a verb", "verbs"),
    Feature("key_adjective", "h.key_pos_is(tokens, 'ADJ', 'ADV')", "token j is an adjective or adverb",
            "adjectives and adverbs"),
    Feature("key_pronoun", "h.key_pos_is(tokens, 'PRON')", "token j is a pronoun", "pronouns"),
    Feature("key_adposition", "h.key_pos_is(tokens, 'ADP')", "token j is a preposition", "prepositions"),
]


def word_features(examples, count: int) -> list[Feature]:
    """One primitive "token j is <word>" for each of the `count` most frequent token texts of the synth
    split: heads often park attention on particular tokens ('the', ',', '.')."""
    import pandas as pd

    synth = examples[examples["split"] == "synth"]
    counts = pd.Series([helpers.normalise(t) for tokens in synth["tokens"] for t in tokens]).value_counts()
    counts = counts[counts.index != ""]
    words = sorted(counts.index, key=lambda w: (-counts[w], w))[:count]
    return [Feature(f"key_word_{i}", f"h.key_is(h.is_token(tokens, {w!r}))", f"token j is {w!r}", repr(w))
            for i, w in enumerate(words)]


# ---- interactions: a chosen cue, only where a modifier holds (or scaled by it) ----
# A head's first few cues, multiplied by these, become candidates too (see synthesize_offline): "the first
# token, and i is capitalized", "token j is 'the', times log(1 + i - j)". Modifiers are never terms alone.

TOKEN_CLASSES = [  # (name, per-token flags, words)
    ("punctuation", "h.is_punctuation(tokens)", "punctuation"),
    ("sentence_end", "h.is_sentence_end(tokens)", "a sentence end"),
    ("stopword", "h.is_stopword(tokens)", "a function word"),
    ("capitalized", "h.is_capitalized(tokens)", "capitalized"),
    ("number", "h.is_number(tokens)", "a number"),
    ("word_start", "h.is_word_start(tokens)", "the start of a word"),
    ("inside_word", "~h.is_word_start(tokens)", "inside a word"),
    ("content_word", "h.is_content_word(tokens)", "a content word"),
]

MODIFIERS = [
    Feature("times_log_distance", "h.log_distance(n)", "times log(1 + i - j)", "", FURTHER_BACK),
    Feature("times_log_position", "h.log_position(n)", "times log(1 + i)", "", "further into the text"),
    Feature("times_log_key_position", "np.log1p(h.key_is(h.positions(tokens)))", "times log(1 + j)", "", LATER),
    Feature("if_same_sentence", "h.same_sentence(tokens)", "and j is in i's sentence", "",
            "when it is in the current sentence"),
    Feature("if_same_word", "h.same_word(tokens)", "and j is in i's word", "", "when it is in the current word"),
] + [Feature(f"if_query_{name}", f"h.query_is({flags})", f"and i is {words}", "", f"when the current token is {words}")
     for name, flags, words in TOKEN_CLASSES] + [
    Feature(f"if_key_{name}", f"h.key_is({flags})", f"and j is {words}", "", f"when it is {words}")
    for name, flags, words in TOKEN_CLASSES]


def product(a: Feature, b: Feature, b_is_modifier: bool) -> Feature:
    """Cue a where b holds, or scaled by b: a modifier, or another primitive ("the first token, when it is
    also the previous token")."""
    if b_is_modifier:
        description, when = f"{a.description}, {b.description}", b.condition
    elif b.target:
        description, when = f"{a.description}, and {b.description}", f"when it is also {b.target}"
    else:
        description, when = f"{a.description}, times {b.description}", b.condition
    name, expression = f"{a.name}*{b.name}", f"{a.expression} * {b.expression}"
    if a.target:
        return Feature(name, expression, description, a.target, _both(a.condition, when))
    return Feature(name, expression, description, "", "", f"{a.more} {when}".strip(), f"{a.less} {when}".strip())


def _both(first: str, second: str) -> str:
    """Two conditions at once: 'when the current token is punctuation and a function word'."""
    if not first or not second:
        return first or second
    for subject in ("when the current token is ", "when it is "):
        if first.startswith(subject) and second.startswith(subject):
            return f"{first} and {second.removeprefix(subject)}"
    return f"{first} and {second.removeprefix('when ')}"


def feature_matrix(feature: Feature, tokens: list[str]) -> np.ndarray:
    """One primitive's n x n matrix for one example (the same expression the emitted program runs)."""
    n = len(tokens)
    return np.asarray(eval(feature.expression, {"np": np, "h": helpers}, {"tokens": tokens, "n": n}), dtype=float)


# ---- per model: every primitive on every example, flattened to the lower triangle ----

def compute_features(examples, out_path: str | Path, n_words: int = 24,
                     splits: tuple[str, ...] = SPLITS_USED) -> None:
    """Write an .npz with the primitives (FEATURES plus `word_features`) and the MODIFIERS: the fields of
    each Feature as arrays named after them in the plural (names, expressions, descriptions, targets, ...;
    `modifier_names`, ... for the modifiers), and per split: X_{split} and M_{split} (entries x primitives /
    modifiers, float32, the lower triangles of all examples stacked row by row), example_ids_{split} and
    lengths_{split}."""
    features = FEATURES + word_features(examples, n_words)
    arrays = {}
    for prefix, group in (("", features), ("modifier_", MODIFIERS)):
        arrays |= {f"{prefix}{field}s": np.array([getattr(f, field) for f in group]) for field in FEATURE_FIELDS}
    for split in splits:
        part = examples[examples["split"] == split].sort_values("example_id")
        if part.empty:
            raise ValueError(f"compute_features: no examples in split '{split}'")
        for key, group in (("X", features), ("M", MODIFIERS)):
            blocks = [np.stack([pack(feature_matrix(f, list(tokens))) for f in group], axis=1) for tokens in part["tokens"]]
            arrays[f"{key}_{split}"] = np.concatenate(blocks).astype(np.float32)
        arrays[f"example_ids_{split}"] = part["example_id"].to_numpy(dtype=np.int64)
        arrays[f"lengths_{split}"] = part["tokens"].map(len).to_numpy(dtype=np.int64)
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def stored_features(arrays, prefix: str = "") -> list[Feature]:
    """The Features saved by compute_features (prefix "modifier_" for the modifiers)."""
    columns = [arrays[f"{prefix}{field}s"] for field in FEATURE_FIELDS]
    return [Feature(*(str(value) for value in row)) for row in zip(*columns)]
