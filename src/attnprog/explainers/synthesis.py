"""One head's synthesis with an LLM explainer: ask, parse, run in the sandbox, rank by JSD, refine once.

1. Show the head's strongest edges on a few synthesis texts and ask for k candidate programs.
2. Write each program found in the reply to `L{layer}H{head}_c{i}.py`; load and run it only through
   `attnprog.programs` (untrusted code runs in the sandbox) on every synthesis text; rank by row JSD.
3. Refinement: show the best candidate's best- and worst-fit texts, real against predicted rows (or, when
   no candidate ran, their errors) and ask for one revised program, `L{layer}H{head}_r0.py`.
4. Write the manifest (docs/ARCHITECTURE.md, "Synthesis manifest"). Every candidate is kept: the rerank
   stage chooses among them by IoU on the validation texts, never on the texts they were written from.

A reply without code, a program cut off by the token limit, code that does not parse or fails in the
sandbox: each becomes a failed candidate with its reason; nothing here raises for what the LLM wrote.
The head's folder is written whole or not at all (`atomic_dir`); replies are already in the reply cache,
so a job killed midway loses nothing it paid for.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from attnprog.atomic import atomic_dir, write_text
from attnprog.contracts import USAGE_FIELDS, Candidate, HeadId, Manifest, SplitExamples
from attnprog.matrices import split_packed, unpack
from attnprog.explainers.claude import ClaudeExplainer
from attnprog.explainers.open_weights import OpenWeightsExplainer
from attnprog.explainers.prompts import FitExample, extract_programs, head_prompt, refinement_prompt, system_prompt
from attnprog.explainers.reply import Conversation, Reply
from attnprog.programs import ProgramError, programs_from_source
from attnprog.runner import run_programs
from attnprog.scoring import row_jsd

def make_explainer(settings: dict, cache_dir: str | os.PathLike | None = None):
    """The explainer named by `settings["backend"]` (settings = the config's `synthesis` section)."""
    backend = settings.get("backend")
    if backend == "claude":
        return ClaudeExplainer(settings["claude"], cache_dir)
    if backend == "open_weights":
        return OpenWeightsExplainer(settings["open_weights"], cache_dir)
    raise ValueError(f"synthesis.backend {backend!r} is not an LLM backend (claude, open_weights)")


def candidates_from_reply(reply: Reply, prefix: str, folder: Path, origin: str, limit: int,
                          refined_from: str | None = None) -> list[Candidate]:
    """Write the reply's programs (at most `limit`) as files and return them as candidates, status "ok" for
    now; a reply that failed or holds no program becomes one failed candidate. The reply's tokens and cost
    are shared out evenly among its candidates (the totals come from the replies themselves)."""
    def make(index, file, status, error):
        return Candidate(name=f"{prefix}{index}", file=file, origin=origin, status=status, error=error,
                         refined_from=refined_from, prompt_hash=reply.key, from_cache=reply.from_cache)

    if reply.error is not None:
        candidates = [make(0, None, reply.error_status, reply.error)]
    else:
        programs = extract_programs(reply.text)[:limit]
        candidates = []
        for index, program in enumerate(programs):
            file = f"{prefix}{index}.py"
            write_text(folder / file, program.code)
            if program.truncated:
                candidates.append(make(index, file, "truncated", "the reply hit the token limit inside this program"))
            else:
                candidates.append(make(index, file, "ok", None))
        if not candidates:
            what = "was cut off by the token limit" if reply.stop_reason == "max_tokens" else "held no ```python block"
            candidates = [make(0, None, "no_program", f"the reply {what}")]
    share = len(candidates)
    for position, candidate in enumerate(candidates):
        for field in USAGE_FIELDS:
            whole, rest = divmod(getattr(reply, field), share)
            setattr(candidate, field, whole + (rest if position == 0 else 0))
        candidate.cost_usd = round(reply.cost_usd / share, 8)
    return candidates


def score_candidates(candidates: list[Candidate], folder: Path, examples: list[tuple[list[str], str]],
                     real: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Run the candidates still "ok" in the sandbox on the synthesis texts; set status, error and mean row
    JSD. Returns the predicted matrices of those that ran on every text."""
    programs = {}
    for candidate in candidates:
        if candidate.status != "ok":
            continue
        try:  # errors name the file as it will be in the head's folder, not the temporary one
            source = (folder / candidate.file).read_text()
            found = programs_from_source(source, candidate.name, path=candidate.file, trusted=False)
            if found[0].kind != "tokens":
                raise ProgramError("rejected", "no `attention(tokens)` function")
            programs[candidate.name] = found[0]
        except ProgramError as e:
            candidate.status, candidate.error = e.status, str(e)
    runs = run_programs(list(programs.values()), examples) if programs else {}
    predicted = {}
    for candidate in candidates:
        run = runs.get(candidate.name)
        if run is None:
            continue
        if run.status != "ok":
            candidate.status, candidate.error = run.status, run.error
            continue
        candidate.synth_jsd = float(np.mean([row_jsd(p, a) for p, a in zip(run.matrices, real)]))
        predicted[candidate.name] = run.matrices
    return predicted


def _fit_examples(predicted: list[np.ndarray], real: list[np.ndarray], tokens: list[list[str]]):
    jsd = [row_jsd(p, a) for p, a in zip(predicted, real)]
    best, worst = int(np.argmin(jsd)), int(np.argmax(jsd))
    return (FitExample(tokens[best], real[best], predicted[best], jsd[best]),
            FitExample(tokens[worst], real[worst], predicted[worst], jsd[worst]))


def synthesize_head_with_llm(examples: SplitExamples, attention: np.ndarray, settings: dict,
                             out_dir: str | os.PathLike, model: str, head: HeadId,
                             cache_dir: str | os.PathLike | None = None, explainer=None) -> Manifest:
    """Synthesize candidate programs for one head with the configured LLM explainer.

    examples: the synth split; attention: the head's packed attention on them; settings: the config's
    `synthesis` section; out_dir: results/{model}/synthesis/L{layer}H{head}/. `cache_dir` overrides the
    backend's cache folder, and `explainer` the backend itself (tests). Writes the candidate files and
    manifest.json; returns the manifest.
    """
    prompt_settings = settings["prompt"]
    explainer = explainer or make_explainer(settings, cache_dir)
    tokens, texts = examples.tokens, examples.texts
    if not tokens:
        raise ValueError(f"{head}: no synthesis examples")
    real = [unpack(flat, n).astype(np.float64) for flat, n in zip(split_packed(attention, examples.lengths),
                                                                 examples.lengths)]
    shown = list(zip(tokens, real))[: prompt_settings["n_examples"]]
    system, first_turn = system_prompt(prompt_settings["helper_docs"]), head_prompt(shown, prompt_settings)
    prefix = head.name
    runnable = list(zip(tokens, texts))

    with atomic_dir(out_dir) as folder:
        conversation = Conversation(system, [{"role": "user", "content": first_turn}],
                                    cache_first_turn=prompt_settings["refine"])
        (reply,) = explainer.ask_many([conversation])
        replies = [("first", reply)]
        candidates = candidates_from_reply(reply, f"{prefix}_c", folder, explainer.backend,
                                           limit=prompt_settings["candidates"])
        predicted = score_candidates(candidates, folder, runnable, real)

        if prompt_settings["refine"] and reply.error is None:
            ran = [c for c in candidates if c.synth_jsd is not None]
            best = min(ran, key=lambda c: c.synth_jsd) if ran else None
            best_fit, worst_fit = _fit_examples(predicted[best.name], real, tokens) if best else (None, None)
            results = [(c.name, c.status, c.synth_jsd, c.error) for c in candidates]
            second_turn = refinement_prompt(results, best.name if best else None, best_fit, worst_fit,
                                            prompt_settings)
            follow_up = Conversation(system, [{"role": "user", "content": first_turn},
                                              {"role": "assistant", "content": reply.text or "(no reply)"},
                                              {"role": "user", "content": second_turn}], cache_first_turn=True)
            (second,) = explainer.ask_many([follow_up])
            replies.append(("refinement", second))
            refined = candidates_from_reply(second, f"{prefix}_r", folder, explainer.backend, limit=1,
                                            refined_from=best.name if best else None)
            score_candidates(refined, folder, runnable, real)
            candidates += refined

        manifest = Manifest(
            model=model, layer=head.layer, head=head.head, backend=explainer.backend,
            explainer_model=getattr(explainer, "model", None) or getattr(explainer, "model_id", None),
            candidates=candidates,
            replies=[{"turn": turn, "prompt_hash": r.key, "stop_reason": r.stop_reason, "error": r.error,
                      "from_cache": r.from_cache, **r.usage()} for turn, r in replies],
            totals={**{f: sum(getattr(r, f) for _, r in replies) for f in USAGE_FIELDS},
                    "cost_usd": sum(r.cost_usd for _, r in replies),
                    "paid_usd": sum(r.cost_usd for _, r in replies if not r.from_cache)})
        manifest.write(folder)
    return manifest
