"""The LLM explainer beside the offline synthesizer (synthesis.llm), compared on the heads it was sampled for.

For each source of candidates (offline, the LLM's own, hybrid, and all of them pooled) every sampled head
takes its best candidate of that source by val IoU, among the causal programs that ran, and is scored on
test; a head where the source has no such program scores IoU 0. The same rule the library's `unrestricted`
baseline uses, so the figures compare with summary.json's. Also: what became of the LLM's candidates (parsed,
ran in the jail, causal), what a head cost in generation seconds and tokens, and how many of the library's
programs each origin wrote.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from attnprog.contracts import (BEST, PROGRAMS, CandidateShares, ExplainerComparison, HeadId, Manifest,
                                ProgramScore, SourceScore)

# The origins of each compared source; `llm` is whichever backend synthesis.llm names.
SOURCES = {"offline": ("offline",), "llm": ("claude", "open_weights"), "hybrid": ("hybrid",),
           "all": ("offline", "claude", "open_weights", "hybrid")}
# Statuses of a candidate that never became a complete, parseable program.
NOT_PARSED = {"no_program", "truncated", "syntax_error", "api_error", "prompt_too_long", "missing"}


def source_score(source: str, scores: dict[HeadId, list[ProgramScore]]) -> SourceScore:
    """Each head's best program of `source` on val (causal, ran), its val and test IoU averaged over heads."""
    origins = SOURCES[source]
    val, test, errors, found = [], [], [], 0
    for rows in scores.values():
        usable = [r for r in rows if r.origin in origins and r.status == "ok" and r.causal]
        best = max(usable, key=lambda r: r.val_iou) if usable else None
        found += best is not None
        val.append(best.val_iou if best else 0.0)
        test.append(best.test_iou if best else 0.0)
        if best is not None and best.test_output_error is not None:
            errors.append(best.test_output_error)
    return SourceScore(source=source, mean_val_iou=float(np.mean(val)), mean_test_iou=float(np.mean(test)),
                       heads_with_program=found,
                       mean_test_output_error=float(np.mean(errors)) if errors and len(errors) == found else None)


def candidate_shares(origin: str, scores: dict[HeadId, list[ProgramScore]]) -> CandidateShares | None:
    rows = [r for head_rows in scores.values() for r in head_rows if r.origin == origin]
    if not rows:
        return None
    n = len(rows)
    return CandidateShares(origin=origin, n=n, parsed=sum(r.status not in NOT_PARSED for r in rows) / n,
                           ran=sum(r.status == "ok" for r in rows) / n,
                           ran_and_causal=sum(r.status == "ok" and r.causal for r in rows) / n)


def compare_explainers(model: str, manifests: dict[HeadId, Manifest], scores: dict[HeadId, list[ProgramScore]],
                       programs: pd.DataFrame, best: pd.DataFrame) -> ExplainerComparison:
    """manifests, scores: the sampled heads' synthesis manifests and rerank rows; programs, best: the library's
    programs.parquet and best.parquet."""
    heads = sorted(manifests)
    replies = [r for m in manifests.values() for r in m.replies]
    backends = {r.origin for rows in scores.values() for r in rows} & set(SOURCES["llm"])
    seconds = {}
    for turn in ("first", "refinement", "hybrid"):
        per_head = [sum(r.get("seconds", 0.0) for r in m.replies if r["turn"] == turn) for m in manifests.values()]
        if any(r["turn"] == turn for r in replies):
            seconds[turn] = float(np.mean(per_head))
    seconds["total"] = float(sum(seconds.values()))
    tokens = {field: float(np.mean([sum(r[field] for r in m.replies) for m in manifests.values()]))
              for field in ("input_tokens", "output_tokens")}
    origin_of = dict(zip(programs["name"], programs["origin"]))
    sampled = {(h.layer, h.head) for h in heads}
    chosen = [origin_of.get(p, "missing") for layer, head, p in zip(best["layer"], best["head"], best["program"])
              if (layer, head) in sampled]
    shares = [candidate_shares(o, scores) for o in (*sorted(backends), "hybrid")]
    return ExplainerComparison(
        model=model, backend=",".join(sorted(backends)) or "none",
        explainer_model=next((m.explainer_model for m in manifests.values() if m.explainer_model), None),
        heads=[h.name for h in heads], sources=[source_score(s, scores) for s in SOURCES],
        candidates=[s for s in shares if s is not None], seconds_per_head=seconds, tokens_per_head=tokens,
        replies_from_cache=float(np.mean([r["from_cache"] for r in replies])) if replies else 0.0,
        library_programs={o: int(n) for o, n in programs[programs["in_library"]]["origin"].value_counts().items()},
        chosen_on_sampled={o: chosen.count(o) for o in sorted(set(chosen))})


def write_explainer_comparison(model: str, synthesis_dirs: list, rerank_files: list, programs_path, best_path,
                               out_path) -> ExplainerComparison:
    """The `explainers` rule: read the sampled heads' manifests and rerank results, and the library's tables."""
    from attnprog.contracts import RerankResult

    manifests = {}
    for folder in synthesis_dirs:
        manifest = Manifest.read(folder)
        manifests[manifest.head_id] = manifest
    scores = {}
    for path in rerank_files:
        rows = RerankResult.read(path).scores
        if rows:
            scores[HeadId(rows[0].layer, rows[0].head)] = rows
    if set(scores) != set(manifests):
        raise ValueError(f"explainers: the rerank results ({len(scores)} heads) and manifests ({len(manifests)}) "
                         "are of different heads")
    comparison = compare_explainers(model, manifests, scores, PROGRAMS.read(programs_path), BEST.read(best_path))
    comparison.write(out_path)
    return comparison
