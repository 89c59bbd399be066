"""Synthesis: candidate programs for one head. The offline synthesizer (default) is here; the LLM explainers
(`attnprog.explainers`) write their candidates in the same format (contracts.Manifest).

The offline synthesizer fits readable attention programs to a head, with no LLM. A program scores every
earlier token j for token i with a weighted sum of readable primitives, and attention is the softmax of that
score over j <= i:

    score(i, j) = 4.2 * [j is the first token] + 2.1 * [j = i - 1] - 0.8 * log(1 + i - j) + ...

    primitives.py   the primitives (expressions over attnprog.helpers), computed once per model
    fit.py          the fit: convex row cross-entropy by Newton's method, greedy forward selection, IoU polish
    sentence.py     one plain-English sentence per candidate: where its attention goes (the docstring's first line)
    writing.py      a fitted candidate as a program file a person can read

Primitives are chosen by greedy forward selection, so the candidates for one head come in increasing sizes
(1, 2, 4, 8, 16 primitives by default): short programs and accurate ones. Rerank and the library choose
among them on val.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ..atomic import atomic_dir
from ..contracts import Candidate, HeadId, HeadInputs, Manifest
from .fit import flat_jsd, greedy_fit, predicted_iou, refine_for_iou, row_softmax, split_data
from .primitives import compute_features
from .sentence import Cue, program_sentence
from .writing import program_source

__all__ = ["compute_features", "synthesize_head", "synthesize_offline"]


def synthesize_offline(features_path, example_ids: list[int], attention: np.ndarray, out_dir, model: str,
                       head: HeadId, settings: dict) -> Manifest:
    """Fit one head's candidates and write them (program files + manifest.json) into out_dir, atomically.

    example_ids, attention: the synth examples and the head's packed attention on them; settings: the
    config's `synthesis.offline` section (sizes, l2, polish). Returns the manifest."""
    with np.load(features_path) as z:
        features = {key: z[key] for key in z.files if not key.endswith("_val")}
    if list(features["example_ids_synth"]) != list(example_ids):
        raise ValueError(f"{features_path} was computed on other synth examples than the head's attention")
    data = split_data(features["X_synth"], features["lengths_synth"], attention)
    sizes = sorted(set(settings.get("sizes", [1, 2, 4, 8, 16])))
    fits = greedy_fit(data, sizes, l2=settings.get("l2", 1e-3))
    names, expressions, descriptions = features["names"], features["expressions"], features["descriptions"]
    cues = [Cue(*(str(features[f"{field}s"][c]) for field in ("target", "condition", "more", "less")))
            for c in range(len(names))]
    candidates, seen = [], set()
    with atomic_dir(out_dir) as folder:
        for columns, weights in fits:
            X = data.X[:, columns]
            if settings.get("polish", True):
                weights = refine_for_iou(X, weights, data, steps=settings.get("polish_steps", 30))
            weights = np.array([float(f"{w:.6g}") for w in weights])  # exactly what the file will say
            key = tuple(sorted(zip(names[columns], np.round(weights, 3))))
            if key in seen:
                continue
            seen.add(key)
            name = f"{head.name}_c{len(candidates)}"
            iou = predicted_iou(X, weights, data)
            jsd = flat_jsd(row_softmax(X @ weights, data.row_starts), data)
            terms = [(float(w), str(expressions[c]), str(descriptions[c])) for c, w in zip(columns, weights)]
            note = (f"Fitted by attnprog's offline synthesizer to layer {head.layer}, head {head.head} of {model} on "
                    f"{len(data.lengths)} synthesis examples (soft IoU {iou:.3f}, row JS distance {jsd:.3f} there).")
            sentence = program_sentence(X, weights, data.row_starts, [cues[c] for c in columns])
            source = program_source(sentence, terms, f"{model} {head.name}", textwrap.fill(note, 100))
            (Path(folder) / f"{name}.py").write_text(source)
            candidates.append(Candidate(name=name, file=f"{name}.py", origin="offline", synth_jsd=jsd, synth_iou=iou,
                                        n_terms=len(terms)))
        manifest = Manifest(model=model, layer=head.layer, head=head.head, backend="offline", candidates=candidates,
                            totals=_no_cost())
        manifest.write(folder)
    return manifest


def _no_cost() -> dict:
    return {"input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": 0.0}


def synthesize_head(settings: dict, model: str, head: HeadId, head_inputs, out_dir, features_path=None) -> Manifest:
    """The `synthesize` rule: dispatch on settings["backend"] (the config's `synthesis` section)."""
    inputs = HeadInputs(head_inputs)
    attention = inputs.attention(head, "synth")
    backend = settings.get("backend", "offline")
    if backend == "offline":
        if features_path is None:
            raise ValueError("synthesis backend 'offline' needs the per-model features file")
        return synthesize_offline(features_path, inputs.examples("synth").example_ids, attention, out_dir, model, head,
                                  settings.get("offline", {}))
    if backend in ("claude", "open_weights"):
        from ..explainers import synthesize_head_with_llm

        return synthesize_head_with_llm(inputs.examples("synth"), attention, settings, out_dir, model, head)
    raise ValueError(f"unknown synthesis backend '{backend}' (expected offline, claude or open_weights)")
