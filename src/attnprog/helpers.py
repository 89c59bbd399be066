"""Helpers that attention programs may use.

A program maps the token strings of one example to an n x n attention matrix (row i = where token i
attends). These helpers describe tokens and positions so programs stay short and readable:

- token facts, one value per token: `is_punctuation`, `is_sentence_end`, `is_word_start`, `is_stopword`,
  `is_content_word`, `is_capitalized`, `is_number`, `is_newline`, `is_token`, `is_first_occurrence`,
  `token_class`, `word_index`, `sentence_index`, `word_start_of`, `sentence_start_of`, `previous_occurrence`;
- n x n matrices to add up into attention scores: `first_token`, `offset` (j = i - k), `distance`,
  `log_distance`, `key_is` / `query_is` (a token fact of j / of i), `same_token`, `induction`,
  `previous_occurrence_matrix`, `same_word`, `same_sentence`, `start_of_word`, `start_of_sentence`,
  `previous_word`, `word_end`, `word_distance`, `most_recent`;
- `causal_softmax` and `normalise_rows` turn scores into attention;
- from a spaCy parse of each prefix (row i reads the parse of tokens[:i+1] only): `pos`, `key_pos_is`,
  `query_pos_is`, `syntactic_head`, `syntactic_dependents`, `same_noun_phrase`, `prefix_docs`.

Tokens are the strings the model saw, with their leading space (`' cat'`); `normalise(token)` strips and
lower-cases them before comparing. A word is a run of tokens with no whitespace in between (as
`str.split()` would cut the text), so `"It's"` is one word of two tokens.

Every helper is causal: the value for token i, or row i of a matrix, depends only on `tokens[:i+1]`.
Matrices are float arrays with zeros above the diagonal.
"""
import functools
import string
import unicodedata

import numpy as np

from . import linguistics, matrices

# Common English function words (determiners, pronouns, auxiliaries, prepositions, conjunctions).
STOPWORDS = frozenset("""
a an the this that these those some any each every no all both either neither
i me my mine myself you your yours yourself he him his himself she her hers herself it its itself
we us our ours ourselves they them their theirs themselves who whom whose which what
am is are was were be been being have has had having do does did doing will would shall should
can could may might must
and or but nor so yet if then than because as while when where why how though although
of at by for with about against between into through during before after above below to from
up down in out on off over under again further once here there very too just not only own same
s t 're 've 'll 'd 's 'm n't
""".split())

SENTENCE_END_CHARS = ".!?"


def _per_token_sequence(fn):
    """Remember a token fact per token sequence: the library runs hundreds of programs on the same examples,
    and these per-token Python loops are most of their cost. Callers get a copy, so changing the result in
    place cannot corrupt what the next program sees."""
    cache = {}

    @functools.wraps(fn)
    def cached(tokens, *args):
        key = (tuple(tokens), args)
        if key not in cache:
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = fn(tokens, *args)
        return cache[key].copy()

    return cached


def normalise(token: str) -> str:
    """The token without surrounding whitespace, lower-cased: `' The'` -> `'the'`."""
    return token.strip().lower()


def positions(tokens: list[str]) -> np.ndarray:
    """0, 1, ..., n-1."""
    return np.arange(len(tokens))


# ---- token facts: one value per token, each depending on that token and the ones before it ----

def _is_punctuation_text(text: str) -> bool:
    return len(text) > 0 and all(
        c in string.punctuation or unicodedata.category(c)[0] in "PS" for c in text)


@_per_token_sequence
def is_punctuation(tokens: list[str]) -> np.ndarray:
    """True where the token is only punctuation or symbols (`','`, `'."'`, `' ('`)."""
    return np.array([_is_punctuation_text(t.strip()) for t in tokens], dtype=bool)


@_per_token_sequence
def is_sentence_end(tokens: list[str]) -> np.ndarray:
    """True where the token is punctuation that ends a sentence (`.`, `!`, `?`, possibly with a quote),
    or a line break."""
    out = []
    for t in tokens:
        s = t.strip()
        out.append(("\n" in t) or (_is_punctuation_text(s) and any(c in SENTENCE_END_CHARS for c in s)))
    return np.array(out, dtype=bool)


@_per_token_sequence
def is_newline(tokens: list[str]) -> np.ndarray:
    """True where the token holds a line break."""
    return np.array(["\n" in t for t in tokens], dtype=bool)


@_per_token_sequence
def is_word_start(tokens: list[str]) -> np.ndarray:
    """True where a new word begins: the first token, a token starting with whitespace, or a token right
    after one ending with whitespace. Whitespace-only tokens start nothing."""
    out = []
    for i, t in enumerate(tokens):
        if not t.strip():
            out.append(False)
        elif i == 0 or t[0].isspace() or tokens[i - 1][-1:].isspace() or not tokens[i - 1]:
            out.append(True)
        else:
            out.append(False)
    return np.array(out, dtype=bool)


@_per_token_sequence
def is_stopword(tokens: list[str]) -> np.ndarray:
    """True where the token is a common English function word (`the`, `and`, `of`, `she`, ...)."""
    return np.array([normalise(t) in STOPWORDS for t in tokens], dtype=bool)


@_per_token_sequence
def is_capitalized(tokens: list[str]) -> np.ndarray:
    """True where the token's first non-space character is an upper-case letter."""
    return np.array([t.strip()[:1].isupper() for t in tokens], dtype=bool)


@_per_token_sequence
def is_number(tokens: list[str]) -> np.ndarray:
    """True where the token is digits only."""
    return np.array([t.strip().isdigit() for t in tokens], dtype=bool)


def is_content_word(tokens: list[str]) -> np.ndarray:
    """True where a word starts that is not a function word or punctuation (`' cat'`, `' Paris'`, `' 19'`)."""
    return is_word_start(tokens) & ~is_stopword(tokens) & ~is_punctuation(tokens)


@_per_token_sequence
def is_token(tokens: list[str], *words: str) -> np.ndarray:
    """True where the normalised token is one of `words`: `is_token(tokens, "and", "or")`."""
    wanted = {normalise(w) for w in words}
    return np.array([normalise(t) in wanted for t in tokens], dtype=bool)


def token_class(tokens: list[str]) -> list[str]:
    """One label per token: 'newline', 'sentence_end', 'punctuation', 'number', 'stopword', 'capitalized',
    'continuation' (inside a word) or 'word'."""
    ends, punct, newline = is_sentence_end(tokens), is_punctuation(tokens), is_newline(tokens)
    number, stop, cap, start = is_number(tokens), is_stopword(tokens), is_capitalized(tokens), is_word_start(tokens)
    labels = []
    for i in range(len(tokens)):
        if newline[i]:
            labels.append("newline")
        elif ends[i]:
            labels.append("sentence_end")
        elif punct[i]:
            labels.append("punctuation")
        elif number[i]:
            labels.append("number")
        elif stop[i]:
            labels.append("stopword")
        elif cap[i]:
            labels.append("capitalized")
        elif not start[i]:
            labels.append("continuation")
        else:
            labels.append("word")
    return labels


@_per_token_sequence
def word_index(tokens: list[str]) -> np.ndarray:
    """The number of the word each token belongs to (0 for the first word)."""
    return np.maximum(np.cumsum(is_word_start(tokens)) - 1, 0)


@_per_token_sequence
def sentence_index(tokens: list[str]) -> np.ndarray:
    """The number of the sentence each token belongs to; a sentence's closing punctuation belongs to it."""
    ends = is_sentence_end(tokens).astype(int)
    return np.concatenate([[0], np.cumsum(ends)[:-1]]) if len(tokens) else np.zeros(0, dtype=int)


def _first_index_of_group(groups: np.ndarray) -> np.ndarray:
    # For a non-decreasing group label per token: the position where each token's group begins.
    n = len(groups)
    starts = np.ones(n, dtype=bool)
    starts[1:] = groups[1:] != groups[:-1]
    return np.maximum.accumulate(np.where(starts, np.arange(n), 0))


def word_start_of(tokens: list[str]) -> np.ndarray:
    """For each token, the position of the first token of its word."""
    return _first_index_of_group(word_index(tokens))


def sentence_start_of(tokens: list[str]) -> np.ndarray:
    """For each token, the position of the first token of its sentence."""
    return _first_index_of_group(sentence_index(tokens))


def is_first_occurrence(tokens: list[str]) -> np.ndarray:
    """True where no earlier token has the same normalised text (the first 'the', the first ',')."""
    return previous_occurrence(tokens) < 0


@_per_token_sequence
def previous_occurrence(tokens: list[str]) -> np.ndarray:
    """For each token, the position of the most recent earlier token with the same normalised text,
    or -1 when there is none (looks back only)."""
    last, out = {}, []
    for i, t in enumerate(tokens):
        key = normalise(t)
        out.append(last.get(key, -1) if key else -1)
        if key:
            last[key] = i
    return np.array(out, dtype=int)


# ---- n x n matrices: entry [i, j] describes key j as seen from query i (zero where j > i) ----

def causal_mask(n: int) -> np.ndarray:
    """True on and below the diagonal: token i may attend to tokens 0..i."""
    return np.tril(np.ones((n, n), dtype=bool))


def first_token(n: int) -> np.ndarray:
    """1 where j is the first token."""
    m = np.zeros((n, n))
    m[:, 0] = 1.0
    return m


def offset(n: int, k: int) -> np.ndarray:
    """1 where j = i - k: `offset(n, 0)` is the token itself, `offset(n, 1)` the previous token."""
    return np.eye(n, k=-k)


def distance(n: int) -> np.ndarray:
    """i - j: how many tokens back key j is."""
    i, j = np.indices((n, n))
    return np.where(j <= i, i - j, 0).astype(float)


def log_distance(n: int) -> np.ndarray:
    """log(1 + i - j): a recency term that decays slowly with distance."""
    return np.log1p(distance(n))


def log_position(n: int) -> np.ndarray:
    """log(1 + i) in row i: multiply by another matrix to make its weight grow with the query position."""
    return np.tril(np.repeat(np.log1p(np.arange(n, dtype=float))[:, None], n, axis=1))


def key_is(flags) -> np.ndarray:
    """flags[j] in every row i >= j: `key_is(is_punctuation(tokens))` marks punctuation keys."""
    flags = np.asarray(flags, dtype=float)
    return np.tril(np.broadcast_to(flags[None, :], (len(flags), len(flags))))


def query_is(flags) -> np.ndarray:
    """flags[i] across row i (up to the diagonal): multiply it with another matrix to switch that
    pattern on only for some query tokens."""
    flags = np.asarray(flags, dtype=float)
    return np.tril(np.broadcast_to(flags[:, None], (len(flags), len(flags))))


def same_token(tokens: list[str]) -> np.ndarray:
    """1 where j < i and token j has the same normalised text as token i (an earlier copy)."""
    keys = np.array([normalise(t) or f"\0{k}" for k, t in enumerate(tokens)], dtype=object)
    return np.tril(keys[:, None] == keys[None, :], k=-1).astype(float)


def induction(tokens: list[str]) -> np.ndarray:
    """1 where token j - 1 is an earlier copy of token i: attend to what followed the current token last
    time (induction heads)."""
    n = len(tokens)
    m = np.zeros((n, n))
    m[:, 1:] = same_token(tokens)[:, :-1]
    return m


def previous_occurrence_matrix(tokens: list[str]) -> np.ndarray:
    """1 at the most recent earlier copy of token i (none when token i is new)."""
    prev = previous_occurrence(tokens)
    m = np.zeros((len(tokens), len(tokens)))
    rows = np.flatnonzero(prev >= 0)
    m[rows, prev[rows]] = 1.0
    return m


def _same_group(groups: np.ndarray) -> np.ndarray:
    return np.tril(groups[:, None] == groups[None, :]).astype(float)


def same_word(tokens: list[str]) -> np.ndarray:
    """1 where j <= i is in the same word as token i."""
    return _same_group(word_index(tokens))


def same_sentence(tokens: list[str]) -> np.ndarray:
    """1 where j <= i is in the same sentence as token i."""
    return _same_group(sentence_index(tokens))


def start_of_word(tokens: list[str]) -> np.ndarray:
    """1 at the first token of token i's word."""
    n = len(tokens)
    m = np.zeros((n, n))
    m[np.arange(n), word_start_of(tokens)] = 1.0
    return m


def start_of_sentence(tokens: list[str]) -> np.ndarray:
    """1 at the first token of token i's sentence."""
    n = len(tokens)
    m = np.zeros((n, n))
    m[np.arange(n), sentence_start_of(tokens)] = 1.0
    return m


def word_end(tokens: list[str]) -> np.ndarray:
    """1 where j < i and token j is the last token of its word (token j + 1 starts a new word or is
    punctuation). Known only for j < i: whether token i ends its word depends on the token after it."""
    n = len(tokens)
    ends = np.zeros(n, dtype=bool)
    if n > 1:
        blank = np.array([not t.strip() for t in tokens[1:]])
        ends[:-1] = is_word_start(tokens)[1:] | is_punctuation(tokens)[1:] | blank
    return np.tril(np.broadcast_to(ends[None, :], (n, n)), k=-1).astype(float)


def word_distance(tokens: list[str]) -> np.ndarray:
    """How many words back token j is from token i (0 inside i's own word)."""
    w = word_index(tokens)
    return np.tril(w[:, None] - w[None, :]).astype(float)


def previous_word(tokens: list[str]) -> np.ndarray:
    """1 where token j belongs to the word before token i's word."""
    w = word_index(tokens)
    return np.tril(w[None, :] == w[:, None] - 1).astype(float)


def most_recent(flags) -> np.ndarray:
    """1 at the most recent position j <= i where flags[j] is true: `most_recent(is_punctuation(tokens))`
    is the last punctuation mark up to token i."""
    flags = np.asarray(flags, dtype=bool)
    n = len(flags)
    last = np.maximum.accumulate(np.where(flags, np.arange(n), -1)) if n else np.zeros(0, dtype=int)
    m = np.zeros((n, n))
    rows = np.flatnonzero(last >= 0)
    m[rows, last[rows]] = 1.0
    return m


# ---- from scores to attention ----

def causal_softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax of each row over j <= i (entries above the diagonal get zero)."""
    scores = np.asarray(scores, dtype=float)
    mask = causal_mask(scores.shape[0])
    s = np.where(mask, scores, -np.inf)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def normalise_rows(weights: np.ndarray) -> np.ndarray:
    """Keep j <= i, clip negatives, divide each row by its sum; an all-zero row attends to token 0."""
    return matrices.normalise(weights).astype(float)  # what every program's output goes through anyway


# ---- linguistic analysis (spaCy), causal: row i reads the parse of tokens[:i+1] only ----
# These parse every prefix of the text (about n^2 / 2 words per example), so they cost more than the
# helpers above; the parses are shared by every program run on the same tokens.

def prefix_docs(tokens: list[str]) -> list:
    """spaCy Docs, one per token: doc i is the parse of the text of tokens[:i+1] (the small English
    pipeline; tokens are matched to spaCy words by character offsets)."""
    return list(linguistics.prefix_analysis(tokens).docs)


def pos(tokens: list[str]) -> np.ndarray:
    """The coarse universal POS tag of each token ('NOUN', 'VERB', 'DET', 'ADP', 'PUNCT', ...; 'SPACE'
    for whitespace), token i's tag taken from the parse of tokens[:i+1]."""
    return linguistics.prefix_analysis(tokens).pos.copy()


def syntactic_head(tokens: list[str]) -> np.ndarray:
    """1 at (i, j) where token j holds the syntactic head of token i in the parse of tokens[:i+1] (the
    root word's head is itself)."""
    return linguistics.prefix_analysis(tokens).head.copy()


def syntactic_dependents(tokens: list[str]) -> np.ndarray:
    """1 at (i, j) where token j holds a syntactic dependent of token i in the parse of tokens[:i+1]."""
    return linguistics.prefix_analysis(tokens).dependents.copy()


def same_noun_phrase(tokens: list[str]) -> np.ndarray:
    """1 at (i, j) where tokens i and j are in the same noun chunk of the parse of tokens[:i+1]
    ('the big dog'); 0 in rows of tokens outside any noun chunk."""
    return linguistics.prefix_analysis(tokens).noun_phrase.copy()


def key_pos_is(tokens: list[str], *tags: str) -> np.ndarray:
    """1 in every row i >= j where token j's POS tag is one of `tags`: `key_pos_is(tokens, "NOUN", "PROPN")`."""
    return key_is(np.isin(pos(tokens), tags))


def query_pos_is(tokens: list[str], *tags: str) -> np.ndarray:
    """1 across row i (up to the diagonal) where token i's POS tag is one of `tags`."""
    return query_is(np.isin(pos(tokens), tags))
