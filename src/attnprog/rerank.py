"""Rerank: run each of one head's candidate programs once on every split, and keep what later stages need.

This is the one place a candidate program runs on the corpus examples. For each program of the head's
candidates (results/{model}/synthesis/L{l}H{h}/) it records, in one `contracts.RerankResult`,
- its outputs on the synth, val and test examples: the library scores every program on every head from
  these, and the report draws them, without running anything again;
- its scores on this head per split (soft IoU, row JS distance, and the relative output error where extraction
  recorded value Grams) and whether it passed the causality check.
Offline candidates are trusted and run in-process; every other origin runs in the sandbox. A candidate that
failed synthesis, or fails here, scores worst: IoU 0, JS distance 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .contracts import SPLITS, HeadId, HeadInputs, Manifest, ProgramScore, RerankResult
from .matrices import pack, split_packed, triangle_size
from .programs import ProgramError, load_programs
from .runner import check_causal, run_programs
from .scoring import iou_table, jsd_rows_flat, output_error_table


def load_candidate_programs(folder, candidate) -> list:
    """The Program objects of one manifest entry (several for a reference-signature file)."""
    return load_programs(Path(folder) / candidate.file, trusted=candidate.trusted)


def rerank_head(candidates_dir, head_inputs, head: HeadId, out_path, *, tokenizer_dir=None, is_causal: bool = True,
                causal_check_examples: int = 2) -> RerankResult:
    """Run and score every candidate of `head`; write its RerankResult to out_path."""
    manifest = Manifest.read(candidates_dir)
    inputs = HeadInputs(head_inputs)
    examples = {s: inputs.examples(s) for s in SPLITS}
    real = {s: split_packed(inputs.attention(head, s), examples[s].lengths) for s in SPLITS}
    grams = ({s: split_packed(inputs.value_grams(head, s), examples[s].lengths) for s in SPLITS}
             if inputs.has_value_grams else None)

    rows, programs = [], []
    for candidate in manifest.candidates:
        base = {"layer": head.layer, "head": head.head, "file": candidate.file, "origin": candidate.origin,
                "n_terms": candidate.n_terms}
        loaded, status, error = [], candidate.status, candidate.error
        if status == "ok":
            try:
                loaded = load_candidate_programs(candidates_dir, candidate)
            except (ProgramError, FileNotFoundError) as e:
                status, error = getattr(e, "status", "missing"), str(e)
        if not loaded:
            rows.append({**base, "name": candidate.name, "status": status, "error": error, "causal": False,
                         "source_chars": 0, **_worst_scores()})
        for program in loaded:
            rows.append({**base, "name": program.name, "status": "ok", "error": None,
                         "source_chars": len(program.source)})
            programs.append(program)

    outputs = _run_on_splits(programs, examples, tokenizer_dir, causal=is_causal)
    row_of = {row["name"]: row for row in rows}
    check_on = examples["val"].calls()[:causal_check_examples]
    errors = None if grams is None or not programs else {  # split -> (P,): every program at once
        s: output_error_table(split_packed(outputs[s][0], examples[s].lengths), [r[None] for r in real[s]],
                              [g[None] for g in grams[s]])[:, 0] for s in SPLITS}
    for p, program in enumerate(programs):
        row = row_of[program.name]
        failures = {s: outputs[s][1][p] for s in SPLITS}
        if any(f.all() for f in failures.values()):  # failed on every example of a split: report why
            status, error = next(outputs[s][2][p] for s in SPLITS if outputs[s][2][p][0] != "ok")
            row.update(status=status, error=error, causal=False, **_worst_scores())
            continue
        row["causal"] = bool(check_causal(program, check_on, tokenizer_dir=tokenizer_dir)) if is_causal else True
        for split in SPLITS:
            flat = split_packed(outputs[split][0][p], examples[split].lengths)
            row[f"{split}_iou"] = float(iou_table([f[None] for f in flat], [r[None] for r in real[split]])[0, 0])
            row[f"{split}_jsd"] = float(np.mean([jsd_rows_flat(f.astype(np.float64), r.astype(np.float64), n)
                                                 for f, r, n in zip(flat, real[split], examples[split].lengths)]))
            if errors is not None:
                row[f"{split}_output_error"] = float(errors[split][p])
    result = RerankResult([ProgramScore(**row) for row in rows], [p.name for p in programs],
                          {s: (np.asarray(examples[s].example_ids), np.asarray(examples[s].lengths), outputs[s][0],
                               outputs[s][1]) for s in SPLITS})
    result.write(out_path)
    return result


def _worst_scores() -> dict:
    return {**{f"{s}_iou": 0.0 for s in SPLITS}, **{f"{s}_jsd": 1.0 for s in SPLITS}}


def _run_on_splits(programs, examples, tokenizer_dir, causal: bool) -> dict:
    """Run every program once on the examples of all splits together. Returns per split (outputs (P, D)
    float32 packed, failed (P, E) bool, first failure (status, error) per program)."""
    calls = [c for s in SPLITS for c in examples[s].calls()]
    runs = run_programs(programs, calls, tokenizer_dir=tokenizer_dir, causal=causal) if programs else {}
    out, start = {}, 0
    for split in SPLITS:
        lengths = examples[split].lengths
        width = sum(triangle_size(n) for n in lengths)
        values = np.zeros((len(programs), width), dtype=np.float32)
        failed = np.zeros((len(programs), len(lengths)), dtype=bool)
        first_failure = []
        for p, program in enumerate(programs):
            run = runs[program.name]
            matrices = run.matrices[start:start + len(lengths)]
            offset, failure = 0, ("ok", None)
            for e, (matrix, n) in enumerate(zip(matrices, lengths)):
                if matrix is None:
                    failed[p, e] = True
                    failure = failure if failure[0] != "ok" else (run.status, run.error)
                else:
                    values[p, offset:offset + triangle_size(n)] = pack(matrix)
                offset += triangle_size(n)
            first_failure.append(failure)
        out[split] = (values, failed, first_failure)
        start += len(lengths)
    return out
