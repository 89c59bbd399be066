"""One head synthesized by the Claude backend against a fake Messages API: prompts, refinement, parsing of
good and bad replies, the sandbox verdicts, the manifest, and a second run that asks nothing."""
import json

from dataclasses import asdict

import numpy as np
import pytest

from attnprog.config import validate_config
from attnprog.contracts import HeadId, SplitExamples
from attnprog.matrices import pack
from attnprog.explainers import synthesize_head_with_llm
from attnprog.explainers.claude import ClaudeExplainer
from test_explainers_claude import MINIMAL, FakeAPI, message

TEXTS = ["The cat sat on the mat.", "A dog ran, and then it slept.", "Birds sing in the early morning.",
         "She read the book twice.", "Rain fell all night long."]

PREVIOUS_TOKEN = '''"""Each token attends to the token before it."""
import numpy as np
from attnprog import helpers as h


def attention(tokens):
    n = len(tokens)
    return h.offset(n, 1) + 0.01 * h.first_token(n)
'''
SELF = '''"""Each token attends to itself."""
import numpy as np


def attention(tokens):
    return np.eye(len(tokens))
'''
BROKEN = "def attention(tokens):\n    return [[\n"
ESCAPES = '"""Reads a file."""\nimport os\n\n\ndef attention(tokens):\n    return os.listdir(".")\n'
CRASHES = '"""Divides by zero."""\n\n\ndef attention(tokens):\n    return 1 / 0\n'


def fenced(*programs):
    return "\n".join(f"Hypothesis {i}.\n```python\n{p}```\n" for i, p in enumerate(programs))


def head_data():
    tokens = [["<s>"] + [(" " if k else "") + w for k, w in enumerate(t.split())] for t in TEXTS]
    examples = SplitExamples(list(range(len(TEXTS))), tokens, TEXTS)
    attention = []
    for t in tokens:  # a previous-token head, with a little attention on the first token
        n = len(t)
        a = 0.9 * np.eye(n, k=-1)
        a[:, 0] += 0.1
        a[0, 0] = 1.0
        attention.append(pack(a / a.sum(axis=1, keepdims=True)))
    return np.concatenate(attention).astype(np.float32), examples


def settings(**prompt):
    config = validate_config({**MINIMAL, "synthesis": {"backend": "claude",
                                                       "prompt": {"n_examples": 2, **prompt}}})
    return config["synthesis"]


def run(tmp_path, api, cache="cache", **prompt):
    attention, examples = head_data()
    s = settings(**prompt)
    explainer = ClaudeExplainer(s["claude"], tmp_path / cache, client=api.client())
    out = tmp_path / "results" / "L3H5"
    manifest = synthesize_head_with_llm(examples, attention, s, out, "m", HeadId(3, 5), explainer=explainer)
    return asdict(manifest), out


@pytest.mark.jail  # the replies' programs run in the sandbox
def test_candidates_are_run_ranked_refined_and_recorded(tmp_path):
    api = FakeAPI(message(fenced(SELF, PREVIOUS_TOKEN, BROKEN), input_tokens=3000, output_tokens=600,
                          cache_write=2500),
                  message(fenced(PREVIOUS_TOKEN.replace("0.01", "0.1")), input_tokens=400, output_tokens=200,
                          cache_read=5500))
    manifest, out = run(tmp_path, api)
    by_name = {c["name"]: c for c in manifest["candidates"]}
    assert list(by_name) == ["L3H5_c0", "L3H5_c1", "L3H5_c2", "L3H5_r0"]
    assert by_name["L3H5_c2"]["status"] == "syntax_error" and "L3H5_c2.py" in by_name["L3H5_c2"]["error"]
    assert by_name["L3H5_c1"]["synth_jsd"] < by_name["L3H5_c0"]["synth_jsd"]
    assert by_name["L3H5_r0"]["refined_from"] == "L3H5_c1" and by_name["L3H5_r0"]["status"] == "ok"
    assert all(c["origin"] == "claude" for c in manifest["candidates"])
    assert sorted(p.name for p in out.glob("*.py")) == ["L3H5_c0.py", "L3H5_c1.py", "L3H5_c2.py", "L3H5_r0.py"]
    assert json.loads((out / "manifest.json").read_text()) == manifest

    # The refinement turn continues the conversation and shows the best candidate's fit.
    first, second = (json.loads(r.content) for r in api.requests)
    assert second["messages"][0] == first["messages"][0]
    assert second["messages"][1]["role"] == "assistant" and "Hypothesis 1." in second["messages"][1]["content"][0]["text"]
    refinement = second["messages"][2]["content"][0]["text"]
    assert "The best was L3H5_c1" in refinement and "L3H5_c2: failed (syntax_error" in refinement
    assert "Worst fit" in refinement and "real ->" in refinement

    # Tokens and dollars: per reply from the usage fields, shared out over candidates, summed in totals.
    totals = manifest["totals"]
    assert totals["input_tokens"] == 3400 and totals["cache_read_tokens"] == 5500
    expected = ((3000 * 3 + 600 * 15 + 2500 * 3.75) + (400 * 3 + 200 * 15 + 5500 * 0.3)) / 1e6
    assert totals["cost_usd"] == pytest.approx(expected) and totals["paid_usd"] == pytest.approx(expected)
    assert sum(c["cost_usd"] for c in manifest["candidates"]) == pytest.approx(expected)
    assert sum(c["output_tokens"] for c in manifest["candidates"]) == 800


@pytest.mark.jail  # the replies' programs run in the sandbox
def test_a_rerun_asks_nothing_and_reproduces_the_manifest(tmp_path):
    replies = (message(fenced(SELF, PREVIOUS_TOKEN)), message(fenced(PREVIOUS_TOKEN)))
    manifest, out = run(tmp_path, FakeAPI(*replies))
    silent = FakeAPI()
    again, _ = run(tmp_path, silent)
    assert silent.requests == []
    assert again["totals"]["paid_usd"] == 0 and again["totals"]["cost_usd"] == manifest["totals"]["cost_usd"]
    assert [c["synth_jsd"] for c in again["candidates"]] == [c["synth_jsd"] for c in manifest["candidates"]]
    assert all(c["from_cache"] for c in again["candidates"])


@pytest.mark.jail  # the replies' programs run in the sandbox
def test_junk_replies_become_failed_candidates(tmp_path):
    api = FakeAPI(message(fenced(ESCAPES, CRASHES) + "Hypothesis 3.\n```python\ndef attention(tokens):\n    ret",
                          stop="max_tokens"),
                  message("I am not sure what this head does."))
    manifest, out = run(tmp_path, api)
    status = {c["name"]: c["status"] for c in manifest["candidates"]}
    assert status == {"L3H5_c0": "rejected", "L3H5_c1": "runtime_error", "L3H5_c2": "truncated",
                      "L3H5_r0": "no_program"}
    assert "ZeroDivisionError" in manifest["candidates"][1]["error"]
    refinement = json.loads(api.requests[1].content)["messages"][2]["content"][0]["text"]
    assert "None of the programs ran" in refinement
    assert manifest["candidates"][3]["file"] is None and not (out / "L3H5_r0.py").exists()


@pytest.mark.jail  # the replies' programs run in the sandbox
def test_refinement_can_be_switched_off(tmp_path):
    api = FakeAPI(message(fenced(SELF)))
    manifest, _ = run(tmp_path, api, refine=False, candidates=1)
    assert [c["name"] for c in manifest["candidates"]] == ["L3H5_c0"] and len(api.requests) == 1
    body = json.loads(api.requests[0].content)
    assert "cache_control" not in body["messages"][0]["content"][0]  # no second turn to reuse it


def test_a_request_the_api_refuses_is_one_failed_candidate(tmp_path):
    api = FakeAPI((400, {"type": "error", "error": {"type": "invalid_request_error", "message": "too long"}}))
    manifest, out = run(tmp_path, api)
    (candidate,) = manifest["candidates"]
    assert candidate["status"] == "api_error" and "too long" in candidate["error"]
    assert len(api.requests) == 1 and (out / "manifest.json").exists()
