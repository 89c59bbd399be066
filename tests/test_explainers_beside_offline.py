"""synthesis.llm: an LLM explainer beside the offline synthesizer on sampled heads. Its candidates join the
offline ones in the head's folder, the hybrid turn shows it the offline fit's best program and where it
fails, and the comparison scores each source the way the library would choose from it."""
import json
from dataclasses import asdict

import pandas as pd
import pytest

from attnprog.config import validate_config
from attnprog.contracts import Candidate, HeadId, Manifest, ProgramScore
from attnprog.explainers import add_llm_candidates
from attnprog.explainers.claude import ClaudeExplainer
from attnprog.explainers.comparison import compare_explainers
from test_explainers_claude import MINIMAL, FakeAPI, message
from test_explainers_synthesis import BROKEN, PREVIOUS_TOKEN, SELF, fenced, head_data

FIRST_TOKEN = '''"""Mostly the first token."""
import numpy as np
from attnprog import helpers as h


def attention(tokens: list[str]) -> np.ndarray:
    n = len(tokens)
    score = np.zeros((n, n))
    score += 4.0 * h.first_token(n)  # j is the first token
    return h.causal_softmax(score)
'''
# The offline fit's better program: the previous token, with the first token's pull fitted too.
OFFLINE_BEST = FIRST_TOKEN.replace("Mostly the first token.", "Mostly the previous token.").replace(
    "score += 4.0 * h.first_token(n)  # j is the first token",
    "score += 2.0 * h.first_token(n)  # j is the first token\n    score += 5.0 * h.offset(n, 1)  # j = i - 1")


def settings():
    config = validate_config({**MINIMAL, "synthesis": {"backend": "offline", "llm": {"backend": "claude"},
                                                       "prompt": {"n_examples": 2}}})
    return config["synthesis"]


def offline_head(folder):
    """A head's folder as the offline synthesizer leaves it: two trusted candidates and their manifest."""
    folder.mkdir(parents=True)
    (folder / "L3H5_c0.py").write_text(FIRST_TOKEN)
    (folder / "L3H5_c1.py").write_text(OFFLINE_BEST)
    (folder / "L3H5_c2.py").write_text(OFFLINE_BEST)
    # c2 fits best, but is longer than the hybrid turn shows (synthesis.llm.hybrid_max_terms)
    candidates = [Candidate(name=f"L3H5_c{i}", file=f"L3H5_c{i}.py", origin="offline", synth_jsd=jsd, n_terms=terms)
                  for i, (jsd, terms) in enumerate(((0.6, 1), (0.2, 2), (0.1, 9)))]
    return Manifest(model="m", layer=3, head=5, backend="offline", candidates=candidates)


@pytest.mark.jail  # the LLM's programs run in the sandbox
def test_llm_and_hybrid_candidates_join_the_offline_ones(tmp_path):
    attention, examples = head_data()
    folder = tmp_path / "L3H5"
    offline = offline_head(folder)
    improved = PREVIOUS_TOKEN.replace("0.01", "0.1")
    api = FakeAPI(message(fenced(SELF, PREVIOUS_TOKEN)), message(fenced(improved)), message(fenced(BROKEN, improved)))
    explainer = ClaudeExplainer(settings()["claude"], tmp_path / "cache", client=api.client())
    manifest = add_llm_candidates(offline, folder, examples, attention, settings(), explainer=explainer)

    by_name = {c.name: c for c in manifest.candidates}
    assert list(by_name) == ["L3H5_c0", "L3H5_c1", "L3H5_c2", "L3H5_l0", "L3H5_l1", "L3H5_lr0", "L3H5_h0"]
    assert [c.origin for c in manifest.candidates] == ["offline"] * 3 + ["claude"] * 3 + ["hybrid"]
    assert by_name["L3H5_c1"] == offline.candidates[1]  # the offline candidates are left as they were
    assert by_name["L3H5_l1"].synth_jsd < by_name["L3H5_l0"].synth_jsd and by_name["L3H5_lr0"].refined_from == "L3H5_l1"
    # one program is asked for, and taken: the reply's first
    assert by_name["L3H5_h0"].status == "syntax_error" and by_name["L3H5_h0"].refined_from == "L3H5_c1"
    assert sorted(p.name for p in folder.glob("*.py")) == sorted(f"{name}.py" for name in by_name)
    assert manifest.backend == "offline" and manifest.explainer_model == settings()["claude"]["model"]
    assert [r["turn"] for r in manifest.replies] == ["first", "refinement", "hybrid"]
    assert all(isinstance(r["seconds"], float) for r in manifest.replies)

    # The hybrid turn is a conversation of its own: the head's edges, the offline fit's best program (not the
    # other) with where it fails, and the request to improve on it.
    hybrid = json.loads(api.requests[2].content)
    (turn,) = hybrid["messages"]
    text = turn["content"][0]["text"] if isinstance(turn["content"], list) else turn["content"]
    assert "### Example 1" in text and "score += 5.0 * h.offset(n, 1)" in text and "Mostly the first token" not in text
    assert "Worst fit" in text and "real ->" in text and "one program that improves on L3H5_c1" in text


def score(name, origin, val, test, status="ok", causal=True):
    return ProgramScore(layer=0, head=0, name=name, file=f"{name}.py", origin=origin, status=status, causal=causal,
                        val_iou=val, test_iou=test)


def test_each_source_is_scored_by_its_best_program_on_val_reported_on_test():
    a, b = HeadId(0, 1), HeadId(2, 0)
    scores = {
        a: [score("a_off", "offline", 0.5, 0.45), score("a_llm", "open_weights", 0.7, 0.6),
            score("a_llm_bad", "open_weights", 0.9, 0.9, causal=False),  # not causal: never chosen
            score("a_hyb", "hybrid", 0.6, 0.65)],
        b: [score("b_off", "offline", 0.4, 0.35), score("b_off2", "offline", 0.3, 0.5),  # val chooses, not test
            score("b_llm", "open_weights", 0.0, 0.0, status="no_program"),
            score("b_hyb", "hybrid", 0.2, 0.1, status="runtime_error")]}
    manifests = {h: Manifest(model="m", layer=h.layer, head=h.head, backend="offline", candidates=[],
                             explainer_model="coder",
                             replies=[{"turn": t, "seconds": s, "from_cache": c, "input_tokens": 100, "output_tokens": 10}
                                      for t, s, c in (("first", 3.0, False), ("refinement", 2.0, False),
                                                      ("hybrid", 1.0, True))]) for h in scores}
    programs = pd.DataFrame({"name": ["a_off", "a_llm", "b_off"], "origin": ["offline", "open_weights", "offline"],
                             "in_library": [True, True, False]})
    best = pd.DataFrame({"layer": [0, 2, 5], "head": [1, 0, 0], "program": ["a_llm", "a_off", "a_off"]})
    result = compare_explainers("m", manifests, scores, programs, best)

    by = {s.source: s for s in result.sources}
    assert by["offline"].mean_test_iou == pytest.approx((0.45 + 0.35) / 2) and by["offline"].heads_with_program == 2
    assert by["llm"].mean_test_iou == pytest.approx(0.6 / 2) and by["llm"].heads_with_program == 1
    assert by["hybrid"].mean_test_iou == pytest.approx(0.65 / 2)
    assert by["all"].mean_test_iou == pytest.approx((0.6 + 0.35) / 2)
    shares = {c.origin: c for c in result.candidates}
    assert (shares["open_weights"].n, shares["open_weights"].parsed, shares["open_weights"].ran,
            shares["open_weights"].ran_and_causal) == (3, pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert shares["hybrid"].ran == pytest.approx(0.5) and shares["hybrid"].parsed == 1.0
    assert result.seconds_per_head == {"first": 3.0, "refinement": 2.0, "hybrid": 1.0, "total": 6.0}
    assert result.tokens_per_head == {"input_tokens": 300.0, "output_tokens": 30.0}
    assert result.replies_from_cache == pytest.approx(1 / 3)
    assert result.library_programs == {"offline": 1, "open_weights": 1}
    assert result.chosen_on_sampled == {"offline": 1, "open_weights": 1}  # head (5, 0) is not sampled
    assert result.heads == ["L0H1", "L2H0"] and result.backend == "open_weights"
    assert type(result).from_dict(asdict(result), "x") == result
