import numpy as np
import pytest

from attnprog import helpers as h

TOKENS = ["The", " cat", " sat", ".", " The", " dog", "'s", " cat", " ran", ",", " 19", "99", "!", "\n", "Then"]


def test_token_facts():
    assert h.is_punctuation(TOKENS).tolist() == [t in (".", ",", "!") for t in TOKENS]
    assert h.is_sentence_end(TOKENS)[[3, 12, 13]].all() and h.is_sentence_end(TOKENS).sum() == 3
    # "'s" and "99" continue a word; the token after a line break starts one
    assert h.is_word_start(TOKENS).tolist() == [True, True, True, False, True, True, False, True, True, False,
                                               True, False, False, False, True]
    assert h.is_stopword(TOKENS)[[0, 4]].all() and not h.is_stopword(TOKENS)[1]
    assert h.is_capitalized(TOKENS)[[0, 4, 14]].all() and h.is_capitalized(TOKENS).sum() == 3
    assert h.is_number(TOKENS).tolist() == [t.strip().isdigit() for t in TOKENS]
    assert h.is_token(TOKENS, "the").tolist() == [i in (0, 4) for i in range(len(TOKENS))]
    # a content word starts a word and is neither a function word ('The', 'Then') nor punctuation
    assert np.flatnonzero(h.is_content_word(TOKENS)).tolist() == [1, 2, 5, 7, 8, 10]


def test_indexes_and_occurrences():
    assert h.sentence_index(TOKENS).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3]
    assert h.sentence_start_of(TOKENS)[[3, 4, 12, 14]].tolist() == [0, 4, 4, 14]
    assert h.word_start_of(TOKENS)[[6, 11, 12]].tolist() == [5, 10, 10]
    prev = h.previous_occurrence(TOKENS)
    assert prev[4] == 0 and prev[7] == 1 and prev[1] == -1
    assert h.is_first_occurrence(TOKENS)[[0, 1]].all() and not h.is_first_occurrence(TOKENS)[[4, 7]].any()


def test_match_matrices():
    same = h.same_token(TOKENS)
    assert same[7, 1] == 1 and same[4, 0] == 1 and same[7, 7] == 0 and same.sum() == 2
    ind = h.induction(TOKENS)
    # token 7 (' cat') occurred at 1, so token 7 attends to what followed it: 2 (' sat')
    assert ind[7, 2] == 1 and ind[4, 1] == 1 and ind.sum() == 2
    assert h.previous_occurrence_matrix(TOKENS)[7, 1] == 1
    assert h.most_recent(h.is_punctuation(TOKENS))[8, 3] == 1
    assert h.most_recent(h.is_punctuation(TOKENS))[2].sum() == 0
    assert h.start_of_sentence(TOKENS)[12, 4] == 1
    assert h.previous_word(TOKENS)[7, 5] == 1 and h.previous_word(TOKENS)[7, 6] == 1
    # ' dog' (5) is followed by "'s", which continues the word: the word ends at 6, known from row 7 on
    ends = h.word_end(TOKENS)
    assert ends[7, 6] == 1 and ends[7, 5] == 0 and ends[6, 6] == 0 and ends[4, 3] == 1
    assert h.word_distance(TOKENS)[8, 5] == 2 and h.word_distance(TOKENS)[6, 5] == 0


MATRIX_HELPERS = {
    "first_token": lambda t: h.first_token(len(t)),
    "offset": lambda t: h.offset(len(t), 2),
    "log_distance": lambda t: h.log_distance(len(t)),
    "log_position": lambda t: h.log_position(len(t)),
    "key_is": lambda t: h.key_is(h.is_punctuation(t)),
    "query_is": lambda t: h.query_is(h.is_word_start(t)),
    "same_token": h.same_token,
    "induction": h.induction,
    "previous_occurrence_matrix": h.previous_occurrence_matrix,
    "same_word": h.same_word,
    "same_sentence": h.same_sentence,
    "start_of_word": h.start_of_word,
    "start_of_sentence": h.start_of_sentence,
    "previous_word": h.previous_word,
    "word_end": h.word_end,
    "word_distance": h.word_distance,
    "most_recent": lambda t: h.most_recent(h.is_sentence_end(t)),
    "first_occurrence": lambda t: h.key_is(h.is_first_occurrence(t)),
    "content_word": lambda t: h.query_is(h.is_content_word(t)),
    # from spaCy parses of each prefix
    "syntactic_head": h.syntactic_head,
    "syntactic_dependents": h.syntactic_dependents,
    "same_noun_phrase": h.same_noun_phrase,
    "key_pos_is": lambda t: h.key_pos_is(t, "NOUN", "PROPN"),
    "query_pos_is": lambda t: h.query_pos_is(t, "VERB"),
    "pos": lambda t: h.key_is(h.pos(t) == "DET") + 2 * h.query_is(h.pos(t) == "NOUN"),
}


@pytest.mark.parametrize("name", sorted(MATRIX_HELPERS))
def test_matrix_helpers_are_causal_and_lower_triangular(name):
    fn = MATRIX_HELPERS[name]
    full = fn(TOKENS)
    assert full.shape == (len(TOKENS), len(TOKENS))
    assert np.all(np.triu(full, k=1) == 0)
    for k in range(1, len(TOKENS)):
        for tail in (TOKENS[k:][::-1], [" The"] * (len(TOKENS) - k), [". "] * (len(TOKENS) - k)):
            changed = fn(TOKENS[:k] + tail)
            np.testing.assert_array_equal(changed[:k, :k], full[:k, :k], err_msg=f"{name}, cut at {k}")
            np.testing.assert_array_equal(fn(TOKENS[:k]), full[:k, :k], err_msg=f"{name}, prefix {k}")


def test_causal_softmax_and_normalise_rows():
    scores = np.arange(16, dtype=float).reshape(4, 4)
    a = h.causal_softmax(scores)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    assert np.all(np.triu(a, k=1) == 0)
    np.testing.assert_allclose(a[1, :2], np.exp([4, 5]) / np.exp([4, 5]).sum())
    # above the diagonal is dropped, negatives are clipped, an empty row attends to token 0
    w = h.normalise_rows(np.array([[0.0, 0, 5], [-1.0, 0, 7], [1.0, 3.0, 9.0]]))
    np.testing.assert_allclose(w, [[1, 0, 0], [1, 0, 0], [1 / 13, 3 / 13, 9 / 13]])


def test_empty_and_whitespace_tokens():
    assert h.sentence_index([]).shape == (0,)
    assert h.is_word_start([" ", "1"]).tolist() == [False, True]
    assert h.same_token([" ", " "]).sum() == 0  # whitespace never matches itself


def test_cached_token_facts_are_copies():
    first = h.is_punctuation(TOKENS)
    first[:] = True  # a program scribbling on a helper's result...
    assert h.is_punctuation(TOKENS).sum() == 3  # ...does not change what the next caller gets
    assert h.is_token(TOKENS, "cat").sum() == 2 and h.is_token(TOKENS, "dog").sum() == 1


SENTENCE = ["The", " big", " dog", " chased", " the", " small", " cat", " up", " the", " tree", "."]


def test_linguistic_helpers_read_the_parse_of_each_prefix():
    docs = h.prefix_docs(SENTENCE)
    assert [doc.text for doc in docs] == ["".join(SENTENCE[:i + 1]) for i in range(len(SENTENCE))]
    tags = h.pos(SENTENCE)
    assert tags.dtype.kind == "U" and tags[3] == "VERB" and tags[6] == "NOUN" and tags[10] == "PUNCT"
    # row 6 (' cat') reads "The big dog chased the small cat": its noun chunk is "the small cat"
    assert np.flatnonzero(h.same_noun_phrase(SENTENCE)[6]).tolist() == [4, 5, 6]
    assert np.flatnonzero(h.syntactic_head(SENTENCE)[10]).tolist() == [3]     # '.' hangs on 'chased'
    assert 2 in np.flatnonzero(h.syntactic_dependents(SENTENCE)[3])          # 'dog' is a dependent of 'chased'
    assert h.key_pos_is(SENTENCE, "NOUN")[9, [2, 6, 9]].all()
    assert h.query_pos_is(SENTENCE, "VERB")[3, :4].all() and not h.query_pos_is(SENTENCE, "VERB")[2].any()


def test_linguistic_helpers_align_tokens_inside_words_and_whitespace():
    tokens = ["<|endoftext|>", "He", " ran", "'s", "\n", " home", "."]
    head = h.syntactic_head(tokens)
    assert head.shape == (7, 7) and not np.triu(head, 1).any()
    assert h.pos(tokens)[4] == "SPACE" and not head[4].any()   # a whitespace-only token has no word
    first = h.syntactic_head(tokens)
    first[:] = 5
    assert h.syntactic_head(tokens).max() <= 1  # results are copies
