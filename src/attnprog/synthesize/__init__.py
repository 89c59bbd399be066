"""Synthesis: candidate programs for one head. The offline synthesizer (default) is here; the LLM explainers
(`attnprog.explainers`) write their candidates in the same format (contracts.Manifest).

The offline synthesizer fits readable attention programs to a head, with no LLM. A program scores every
earlier token j for token i with a weighted sum of readable primitives, and attention is the softmax of that
score over j <= i:

    score(i, j) = 4.2 * [j is the first token] + 2.1 * [j = i - 1] - 0.8 * log(1 + i - j) + ...

    primitives.py   the primitives (expressions over attnprog.helpers) and the modifiers that multiply them,
                    computed once per model
    fit.py          the fit: convex row cross-entropy by Newton's method, greedy forward selection, IoU polish
    output_fit.py   the opt-in output-aware fit (synthesis.offline.objective: output): weights, and terms,
                    chosen for the error in the head's output, which the model pays for, not in its attention
    sentence.py     one plain-English sentence per candidate: where its attention goes (the docstring's first line)
    writing.py      a fitted candidate as a program file a person can read

Primitives are chosen by greedy forward selection, so the candidates for one head come in increasing sizes
(1, 2, 4, 8, 16 terms by default): short programs and accurate ones. Once a head's first 4 cues are
chosen, their products with a few modifiers (a token class of i or of j, same sentence or word, log
distance or position) and with each other become candidates too: "the first token, and i is capitalized".
A head's pull to a cue often depends on such a condition, and these products lift test IoU more than any
family of new single cues did (README, "Offline synthesis"). Rerank and the library choose among the
candidates on val.
"""
from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import numpy as np

from ..atomic import atomic_dir
from ..contracts import Candidate, HeadId, HeadInputs, Manifest
from ..settings import OfflineSynthesisSettings
from .fit import SplitData, flat_jsd, greedy_fit, predicted_iou, refine_for_iou, row_softmax, split_data
from .output_fit import ValueGrams, greedy_output_fit, predicted_output_error, refit_for_output
from .primitives import Feature, compute_features, product, stored_features
from .sentence import program_sentence
from .writing import program_source

__all__ = ["compute_features", "fit_candidates", "synthesize_head", "synthesize_offline"]


def fit_candidates(data: SplitData, modifier_columns: np.ndarray, primitives: list[Feature],
                   modifiers: list[Feature], sizes: list[int], l2: float, interact_after: int,
                   greedy=None) -> list[tuple[list[Feature], np.ndarray, np.ndarray]]:
    """Greedy forward selection over the primitives (columns of data.X); once `interact_after` are chosen,
    their products with the modifiers (modifier_columns, same rows) and with each other join the candidates
    (0: no products). Returns, per size: (the terms, their columns on the split, weights).

    greedy(data, sizes, start=columns) does the selection: by default the cross-entropy's (fit.greedy_fit
    with this l2); output_fit.greedy_output_fit selects by the head's output instead."""
    if greedy is None:
        greedy = functools.partial(greedy_fit, l2=l2)
    early, late = [s for s in sizes if s <= interact_after], [s for s in sizes if s > interact_after]
    if interact_after <= 0 or not late:
        return [([primitives[c] for c in cols], data.X[:, cols], w) for cols, w in greedy(data, sizes)]
    fits = greedy(data, sorted(set(early + [interact_after])))
    out = [([primitives[c] for c in cols], data.X[:, cols], w) for cols, w in fits if len(cols) in early]
    if not fits or len(fits[-1][0]) < interact_after:  # the selection stopped early: nothing left to explain
        return out
    first = fits[-1][0]
    pairs = [(product(primitives[a], modifiers[m], True), (a, m, True)) for a in first for m in range(len(modifiers))]
    pairs += [(product(primitives[a], primitives[b], False), (a, b, False)) for k, a in enumerate(first)
              for b in first[k + 1:]]
    columns = np.stack([data.X[:, a] * (modifier_columns[:, b] if is_modifier else data.X[:, b])
                        for _, (a, b, is_modifier) in pairs], axis=1)
    extended = SplitData(np.hstack([data.X, columns]), data.y, data.lengths, data.row_starts, data.example_starts)
    terms = primitives + [feature for feature, _ in pairs]
    out += [([terms[c] for c in cols], extended.X[:, cols], w) for cols, w in greedy(extended, late, start=first)]
    return out


def offline_fits(data: SplitData, modifier_columns: np.ndarray, primitives: list[Feature], modifiers: list[Feature],
                 settings: OfflineSynthesisSettings, values: ValueGrams | None = None
                 ) -> list[tuple[list[Feature], np.ndarray, np.ndarray]]:
    """Every candidate's (terms, columns on the synth split, weights) as settings.objective asks:

    iou     terms chosen by the cross-entropy, weights fitted to it and polished for IoU
    output  the head's output error (output_fit.py; `values`: the head's value Grams on the same examples):
            the cross-entropy's terms with weights refitted for the output, and terms chosen by the output
            too; both kinds, as each was the better one on about half the heads where this was measured."""
    sizes = sorted(set(settings.sizes))
    interact_after = settings.interact_after
    fits = fit_candidates(data, modifier_columns, primitives, modifiers, sizes, settings.l2, interact_after)
    objective = settings.objective
    if objective == "iou":
        if settings.polish:
            fits = [(f, X, refine_for_iou(X, w, data, steps=settings.polish_steps)) for f, X, w in fits]
        return fits
    if objective != "output":
        raise ValueError(f"unknown offline objective '{objective}' (expected iou or output)")
    if values is None:
        raise ValueError("the offline objective 'output' needs the head's value Grams (recorded at extraction)")
    # no IoU polish here: it would trade the output fit back for IoU
    refits = [(f, X, refit_for_output(X, w, data, values)) for f, X, w in fits]
    return refits + fit_candidates(data, modifier_columns, primitives, modifiers, sizes, settings.l2, interact_after,
                                   greedy=functools.partial(greedy_output_fit, grams=values))


def synthesize_offline(features_path, example_ids: list[int], attention: np.ndarray, out_dir, model: str,
                       head: HeadId, settings: OfflineSynthesisSettings, grams: np.ndarray | None = None) -> Manifest:
    """Fit one head's candidates and write them (program files + manifest.json) into out_dir, atomically.

    example_ids, attention: the synth examples and the head's packed attention on them; settings: the
    config's `synthesis.offline` section as a record; grams: the head's
    packed value Grams on the same examples (objective output only). Returns the manifest."""
    with atomic_dir(out_dir) as folder:
        manifest = write_offline_candidates(folder, features_path, example_ids, attention, model, head, settings, grams)
        manifest.write(folder)
    return manifest


def write_offline_candidates(folder, features_path, example_ids: list[int], attention: np.ndarray, model: str,
                             head: HeadId, settings: OfflineSynthesisSettings, grams: np.ndarray | None = None
                             ) -> Manifest:
    """Fit one head's candidates and write their program files into `folder`; return their manifest (not yet
    written: synthesis.llm may add to it)."""
    with np.load(features_path) as z:
        if list(z["example_ids_synth"]) != list(example_ids):
            raise ValueError(f"{features_path} was computed on other synth examples than the head's attention")
        primitives, modifiers = stored_features(z), stored_features(z, "modifier_")
        X, M, lengths = z["X_synth"], z["M_synth"], z["lengths_synth"]
    data = split_data(X, lengths, attention)
    output = settings.objective == "output"
    values = ValueGrams(grams, data) if output and grams is not None else None
    fits = offline_fits(data, M, primitives, modifiers, settings, values)
    candidates, seen = [], set()
    for features, X, weights in fits:
        weights = np.array([float(f"{w:.6g}") for w in weights])  # exactly what the file will say
        key = tuple(sorted(zip([f.name for f in features], np.round(weights, 3))))
        if key in seen:
            continue
        seen.add(key)
        name = f"{head.name}_c{len(candidates)}"
        iou = predicted_iou(X, weights, data)
        jsd = flat_jsd(row_softmax(X @ weights, data.row_starts), data)
        terms = [(float(w), f.expression, f.description) for f, w in zip(features, weights)]
        if values is None:
            note = (f"Fitted by attnprog's offline synthesizer to layer {head.layer}, head {head.head} of {model} "
                    f"on {len(data.lengths)} synthesis examples (soft IoU {iou:.3f}, row JS distance {jsd:.3f} "
                    "there).")
        else:
            error = predicted_output_error(X, weights, data, values)
            note = (f"Fitted by attnprog's offline synthesizer to the output of layer {head.layer}, head "
                    f"{head.head} of {model} on {len(data.lengths)} synthesis examples (output error {error:.3f} "
                    f"relative to the uniform matrix's, soft IoU {iou:.3f}, row JS distance {jsd:.3f} there).")
        sentence = program_sentence(X, weights, data.row_starts, features)
        source = program_source(sentence, terms, f"{model} {head.name}", textwrap.fill(note, 100))
        (Path(folder) / f"{name}.py").write_text(source)
        candidates.append(Candidate(name=name, file=f"{name}.py", origin="offline", synth_jsd=jsd, synth_iou=iou,
                                    n_terms=len(terms)))
    return Manifest(model=model, layer=head.layer, head=head.head, backend="offline", candidates=candidates,
                    totals=_no_cost())


def _no_cost() -> dict:
    return {"input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0, "cost_usd": 0.0}


def synthesize_head(settings: dict, model: str, head: HeadId, head_inputs, out_dir, features_path=None) -> Manifest:
    """The `synthesize` rule: dispatch on settings["backend"] (the config's `synthesis` section)."""
    inputs = HeadInputs(head_inputs)
    attention = inputs.attention(head, "synth")
    backend = settings["backend"]
    if backend == "offline":
        if features_path is None:
            raise ValueError("synthesis backend 'offline' needs the per-model features file")
        offline = OfflineSynthesisSettings.from_config(settings["offline"])
        grams = inputs.value_grams(head, "synth") if offline.objective == "output" else None
        examples = inputs.examples("synth")
        if "llm" not in settings:
            return synthesize_offline(features_path, examples.example_ids, attention, out_dir, model, head, offline,
                                      grams)
        from ..explainers import add_llm_candidates  # this head is in synthesis.llm's sample

        with atomic_dir(out_dir) as folder:
            manifest = write_offline_candidates(folder, features_path, examples.example_ids, attention, model, head,
                                                offline, grams)
            manifest = add_llm_candidates(manifest, Path(folder), examples, attention, settings)
            manifest.write(folder)
        return manifest
    if backend in ("claude", "open_weights"):
        from ..explainers import synthesize_head_with_llm

        return synthesize_head_with_llm(inputs.examples("synth"), attention, settings, out_dir, model, head)
    raise ValueError(f"unknown synthesis backend '{backend}' (expected offline, claude or open_weights)")
