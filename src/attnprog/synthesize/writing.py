"""Writing a fitted candidate as a readable program file."""
from __future__ import annotations

import textwrap


def program_source(sentence: str, terms: list[tuple[float, str, str]], title: str, fit_note: str) -> str:
    """The text of a program file: the sentence (sentence.program_sentence) is the docstring's first line.
    terms: (weight, helpers expression, plain-English description)."""
    terms = sorted(terms, key=lambda t: -abs(t[0]))
    width = max(len(f"{abs(w):.4g}") for w, _, _ in terms)
    signs = [("-" if w < 0 else " ") if k == 0 else ("-" if w < 0 else "+") for k, (w, _, _) in enumerate(terms)]
    formula = "\n".join(f"    {sign} {abs(w):<{width}.4g} * [{d}]" for sign, (w, _, d) in zip(signs, terms))
    body = "\n".join(f"    score += {w:.6g} * {e}  # {d}" for w, e, d in terms)
    cues = f"{len(terms)} weighted cue{'s' if len(terms) > 1 else ''}"
    intro = textwrap.fill(f"{title}: softmax of {cues}. Token i gives every token j <= i a score and attends by "
                          "the softmax of the scores over j:", 100)
    return f'''"""{sentence}

{intro}

  score(i, j) =
{formula}

{fit_note}
"""
import numpy as np

from attnprog import helpers as h


def attention(tokens: list[str]) -> np.ndarray:
    n = len(tokens)
    score = np.zeros((n, n))
{body}
    return h.causal_softmax(score)
'''
