"""One head's synthesis with an LLM explainer: ask, parse, run in the sandbox, rank by JSD, refine once.

1. Show the head's strongest edges on a few synthesis texts and ask for k candidate programs.
2. Write each program found in the reply to `L{layer}H{head}_c{i}.py`; load and run it only through
   `attnprog.programs` (untrusted code runs in the sandbox) on every synthesis text; rank by row JSD.
3. Refinement: show the best candidate's best- and worst-fit texts, real against predicted rows (or, when
   no candidate ran, their errors) and ask for one revised program, `L{layer}H{head}_r0.py`.
4. Write the manifest (docs/ARCHITECTURE.md, "Synthesis manifest"). Every candidate is kept: the rerank
   stage chooses among them by IoU on the validation texts, never on the texts they were written from.

Beside the offline synthesizer (synthesis.llm, on a sample of heads), steps 1-3 add their candidates to the
offline ones in the head's folder (`L{layer}H{head}_l{i}.py`, `_lr0.py`), and a hybrid turn shows the LLM the
offline fit's best short program with its best- and worst-fit rows and asks for one improvement on it
(`L{layer}H{head}_h0.py`, origin `hybrid`).

A reply without code, a program cut off by the token limit, code that does not parse or fails in the
sandbox: each becomes a failed candidate with its reason; nothing here raises for what the LLM wrote.
The head's folder is written whole or not at all (`atomic_dir`); replies are already in the reply cache,
so a job killed midway loses nothing it paid for.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnprog.atomic import atomic_dir, write_text
from attnprog.contracts import USAGE_FIELDS, Candidate, HeadId, Manifest, SplitExamples
from attnprog.matrices import split_packed, unpack
from attnprog.explainers.claude import ClaudeExplainer
from attnprog.explainers.open_weights import OpenWeightsExplainer
from attnprog.explainers.prompts import (FitExample, add_missing_imports, extract_programs, head_prompt, hybrid_prompt,
                                        refinement_prompt, system_prompt)
from attnprog.explainers.reply import Conversation, Reply
from attnprog.programs import ProgramError, programs_from_source
from attnprog.runner import run_programs
from attnprog.scoring import row_jsd
from attnprog.settings import LLMSampleSettings

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
            write_text(folder / file, add_missing_imports(program.code))
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
    """Run the candidates still "ok" on the synthesis texts (in the sandbox unless their origin is trusted); set
    status, error and mean row JSD. Returns the predicted matrices of those that ran on every text."""
    programs = {}
    for candidate in candidates:
        if candidate.status != "ok":
            continue
        try:  # errors name the file as it will be in the head's folder, not the temporary one
            source = (folder / candidate.file).read_text()
            found = programs_from_source(source, candidate.name, path=candidate.file, trusted=candidate.trusted)
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


@dataclass
class HeadData:
    """What an explainer is shown of one head: its synth-split texts and real attention matrices."""
    tokens: list[list[str]]
    texts: list[str]
    real: list[np.ndarray]

    @classmethod
    def of(cls, examples: SplitExamples, attention: np.ndarray, head: HeadId) -> "HeadData":
        if not examples.tokens:
            raise ValueError(f"{head}: no synthesis examples")
        real = [unpack(flat, n).astype(np.float64) for flat, n in zip(split_packed(attention, examples.lengths),
                                                                     examples.lengths)]
        return cls(list(examples.tokens), list(examples.texts), real)

    def runnable(self) -> list[tuple[list[str], str]]:
        return list(zip(self.tokens, self.texts))

    def shown(self, prompt_settings: dict) -> list[tuple[list[str], np.ndarray]]:
        return list(zip(self.tokens, self.real))[: prompt_settings["n_examples"]]


Turns = list[tuple[str, Reply]]  # (turn kind: first | refinement | hybrid, its reply)


def llm_candidates(explainer, data: HeadData, prompt_settings: dict, folder: Path, head: HeadId,
                   beside_offline: bool = False) -> tuple[list[Candidate], Turns]:
    """The LLM's own candidates for one head, written into `folder`: the first turn's programs and, with
    `refine`, one revision of the best that ran. Named `L3H5_c0`, `L3H5_r0`; beside the offline synthesizer,
    whose candidates are `L3H5_c{i}`, `L3H5_l0` and `L3H5_lr0`."""
    system, first_turn = system_prompt(prompt_settings["helper_docs"]), head_prompt(data.shown(prompt_settings),
                                                                                   prompt_settings)
    first_prefix, refined_prefix = (f"{head.name}_l", f"{head.name}_lr") if beside_offline else \
        (f"{head.name}_c", f"{head.name}_r")
    conversation = Conversation(system, [{"role": "user", "content": first_turn}],
                                cache_first_turn=prompt_settings["refine"])
    (reply,) = explainer.ask_many([conversation])
    turns = [("first", reply)]
    candidates = candidates_from_reply(reply, first_prefix, folder, explainer.backend,
                                       limit=prompt_settings["candidates"])
    predicted = score_candidates(candidates, folder, data.runnable(), data.real)

    if prompt_settings["refine"] and reply.error is None:
        ran = [c for c in candidates if c.synth_jsd is not None]
        best = min(ran, key=lambda c: c.synth_jsd) if ran else None
        best_fit, worst_fit = _fit_examples(predicted[best.name], data.real, data.tokens) if best else (None, None)
        results = [(c.name, c.status, c.synth_jsd, c.error) for c in candidates]
        second_turn = refinement_prompt(results, best.name if best else None, best_fit, worst_fit, prompt_settings)
        follow_up = Conversation(system, [{"role": "user", "content": first_turn},
                                          {"role": "assistant", "content": reply.text or "(no reply)"},
                                          {"role": "user", "content": second_turn}], cache_first_turn=True)
        (second,) = explainer.ask_many([follow_up])
        turns.append(("refinement", second))
        refined = candidates_from_reply(second, refined_prefix, folder, explainer.backend, limit=1,
                                        refined_from=best.name if best else None)
        score_candidates(refined, folder, data.runnable(), data.real)
        candidates += refined
    return candidates, turns


def hybrid_candidates(explainer, data: HeadData, prompt_settings: dict, folder: Path, head: HeadId,
                      offline: list[Candidate], max_terms: int) -> tuple[list[Candidate], Turns]:
    """The LLM shown the offline fit's best program of at most `max_terms` terms (lowest synth JS distance) with
    its best- and worst-fit rows, and asked for one improvement (origin `hybrid`, one turn). None when there is
    no such offline program."""
    fitted = [c for c in offline if c.status == "ok" and c.synth_jsd is not None and (c.n_terms or 0) <= max_terms]
    if not fitted:
        return [], []
    best = dataclasses.replace(min(fitted, key=lambda c: c.synth_jsd))  # a copy: scoring sets its fields
    predicted = score_candidates([best], folder, data.runnable(), data.real)[best.name]
    best_fit, worst_fit = _fit_examples(predicted, data.real, data.tokens)
    turn = hybrid_prompt(data.shown(prompt_settings), best.name, (folder / best.file).read_text(), best.synth_jsd,
                         best_fit, worst_fit, prompt_settings)
    system = system_prompt(prompt_settings["helper_docs"])
    (reply,) = explainer.ask_many([Conversation(system, [{"role": "user", "content": turn}])])
    candidates = candidates_from_reply(reply, f"{head.name}_h", folder, "hybrid", limit=1, refined_from=best.name)
    score_candidates(candidates, folder, data.runnable(), data.real)
    return candidates, [("hybrid", reply)]


def llm_manifest(model: str, head: HeadId, backend: str, explainer, candidates: list[Candidate], turns: Turns
                 ) -> Manifest:
    """A head's manifest with the replies of every turn and their totals."""
    return Manifest(
        model=model, layer=head.layer, head=head.head, backend=backend,
        explainer_model=getattr(explainer, "model", None) or getattr(explainer, "model_id", None),
        candidates=candidates,
        replies=[{"turn": turn, "prompt_hash": r.key, "stop_reason": r.stop_reason, "error": r.error,
                  "from_cache": r.from_cache, "seconds": r.seconds, **r.usage()} for turn, r in turns],
        totals={**{f: sum(getattr(r, f) for _, r in turns) for f in USAGE_FIELDS},
                "cost_usd": sum(r.cost_usd for _, r in turns),
                "paid_usd": sum(r.cost_usd for _, r in turns if not r.from_cache)})


def synthesize_head_with_llm(examples: SplitExamples, attention: np.ndarray, settings: dict,
                             out_dir: str | os.PathLike, model: str, head: HeadId,
                             cache_dir: str | os.PathLike | None = None, explainer=None) -> Manifest:
    """Synthesize candidate programs for one head with the configured LLM explainer (synthesis.backend).

    examples: the synth split; attention: the head's packed attention on them; settings: the config's
    `synthesis` section; out_dir: results/{model}/synthesis/L{layer}H{head}/. `cache_dir` overrides the
    backend's cache folder, and `explainer` the backend itself (tests). Writes the candidate files and
    manifest.json; returns the manifest.
    """
    explainer = explainer or make_explainer(settings, cache_dir)
    data = HeadData.of(examples, attention, head)
    with atomic_dir(out_dir) as folder:
        candidates, turns = llm_candidates(explainer, data, settings["prompt"], folder, head)
        manifest = llm_manifest(model, head, explainer.backend, explainer, candidates, turns)
        manifest.write(folder)
    return manifest


def add_llm_candidates(manifest: Manifest, folder: Path, examples: SplitExamples, attention: np.ndarray,
                       settings: dict, cache_dir: str | os.PathLike | None = None, explainer=None) -> Manifest:
    """An offline head's manifest with the candidates of synthesis.llm's explainer added (written into the
    same folder): the LLM's own and, with `hybrid`, its improvements of the offline fit."""
    llm = LLMSampleSettings.from_config(settings["llm"])
    explainer = explainer or make_explainer({**settings, "backend": llm.backend}, cache_dir)
    head = manifest.head_id
    data = HeadData.of(examples, attention, head)
    candidates, turns = llm_candidates(explainer, data, settings["prompt"], folder, head, beside_offline=True)
    if llm.hybrid:
        more, more_turns = hybrid_candidates(explainer, data, settings["prompt"], folder, head, manifest.candidates,
                                             llm.hybrid_max_terms)
        candidates, turns = candidates + more, turns + more_turns
    return llm_manifest(manifest.model, head, manifest.backend, explainer, manifest.candidates + candidates, turns)
