"""Claude as the explainer, through the anthropic SDK (the paper used Claude Sonnet 4).

Cost control, from cheapest to most involved:
- every reply is cached on disk by the hash of the exact request, so nothing is ever bought twice;
- the static system prompt, and the head's first turn (re-sent with the refinement turn), carry
  `cache_control` breakpoints, so repeats are billed at the cache-read price;
- `use_batches` sends requests through the Message Batches API at half price (replies take minutes to
  hours; a killed job resumes polling the batch it already submitted);
- dollars are computed from each reply's `usage` and the configured per-model prices, appended to the
  shared spend ledger, and a request that could cross `budget_usd` is never sent.

Faults: the SDK retries 408/409/429/5xx and connection errors with exponential backoff (`max_retries`).
A request the API rejects on its own merits (400/413/422, or an errored batch entry) comes back as a Reply
with `error` set, which the caller reports per candidate. Anything else that survives the retries (bad key,
unknown model, an outage) raises ExplainerError: the job fails, and a rerun resumes from the cache.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anthropic

from attnprog.atomic import write_json
from attnprog.explainers.cache import ReplyCache, SpendLedger, request_key
from attnprog.explainers.reply import Conversation, ExplainerError, Reply

API_KEY_VARIABLE = "ANTHROPIC_API_KEY"
# Errors about one request's content: report them for that request and go on.
PER_REQUEST_ERRORS = (anthropic.BadRequestError, anthropic.ContentTooLargeError, anthropic.UnprocessableEntityError)
CHARS_PER_TOKEN_LOWER_BOUND = 2.0  # for the worst-case cost of a request not yet sent (prompts run ~3-4)


def prices_for(settings: dict) -> dict:
    """The configured prices (USD per million tokens) of the chosen model."""
    model, table = settings["model"], settings["prices"]
    if model not in table:
        raise ExplainerError(f"synthesis.claude.prices has no entry for model {model!r}: add its input, output, "
                             "cache_write_5m, cache_write_1h and cache_read prices (USD per million tokens)")
    return table[model]


def cost_usd(usage: dict, prices: dict, batch: bool = False, batch_discount: float = 0.5) -> float:
    """Dollars for one reply from the API's usage fields: uncached input, cache writes (by TTL when the
    breakdown is given, else all at 5 minutes), cache reads and output; batch requests at a discount."""
    breakdown = usage.get("cache_creation") or {}
    write_1h = breakdown.get("ephemeral_1h_input_tokens") or 0
    write_5m = (usage.get("cache_creation_input_tokens") or 0) - write_1h
    dollars = (usage.get("input_tokens", 0) * prices["input"] + usage.get("output_tokens", 0) * prices["output"]
               + write_5m * prices["cache_write_5m"] + write_1h * prices["cache_write_1h"]
               + (usage.get("cache_read_input_tokens") or 0) * prices["cache_read"]) / 1e6
    return dollars * (batch_discount if batch else 1.0)


def _text_block(text: str, cache_ttl: str | None) -> dict:
    block = {"type": "text", "text": text}
    if cache_ttl:
        block["cache_control"] = {"type": "ephemeral", "ttl": cache_ttl}
    return block


class ClaudeExplainer:
    backend = "claude"

    def __init__(self, settings: dict, cache_dir: str | os.PathLike | None = None, client=None, sleep=time.sleep):
        self.settings = settings
        self.model = settings["model"]
        self.prices = prices_for(settings)
        folder = Path(cache_dir or settings["cache_dir"])
        self.cache, self.ledger = ReplyCache(folder), SpendLedger(folder)
        self.batch_folder = folder / "batches"
        self._client = client
        self.sleep = sleep

    @property
    def client(self) -> anthropic.Anthropic:
        # Built on first use, so a run answered wholly from the cache needs no key.
        if self._client is None:
            check_api_key()
            self._client = anthropic.Anthropic(max_retries=self.settings["max_retries"],
                                               timeout=self.settings["timeout_s"])
        return self._client

    def request(self, conversation: Conversation) -> dict:
        """The Messages API request body for a conversation (also what the cache key is computed from)."""
        ttl = self.settings["cache_ttl"] if self.settings["prompt_caching"] else None
        messages = []
        for index, turn in enumerate(conversation.messages):
            cached = ttl if (index == 0 and conversation.cache_first_turn) else None
            messages.append({"role": turn["role"], "content": [_text_block(turn["content"], cached)]})
        return {"model": self.model, "max_tokens": self.settings["max_tokens"],
                "system": [_text_block(conversation.system, ttl)], "messages": messages,
                **self.settings["request_params"]}

    def worst_case_cost(self, request: dict) -> float:
        """An upper bound on a request's price before it is sent: every input token at the cache-write price
        (the dearest input rate) and the full output allowance."""
        chars = len(json.dumps(request["system"])) + len(json.dumps(request["messages"]))
        input_tokens = chars / CHARS_PER_TOKEN_LOWER_BOUND
        price_in = max(self.prices["input"], self.prices["cache_write_5m"], self.prices["cache_write_1h"])
        return (input_tokens * price_in + request["max_tokens"] * self.prices["output"]) / 1e6

    def ask_many(self, conversations: list[Conversation]) -> list[Reply]:
        """One reply per conversation: from the cache where asked before, else from the API."""
        requests = [self.request(c) for c in conversations]
        keys = [request_key(r) for r in requests]
        replies = {}
        for key in keys:
            record = self.cache.get(key)
            if record is not None:
                replies[key] = self._reply(key, record, from_cache=True)
        missing = {key: request for key, request in zip(keys, requests) if key not in replies}
        if missing and self.settings["use_batches"]:
            replies.update(self._ask_batch(missing))
        else:
            for key, request in missing.items():
                replies[key] = self._ask_direct(key, request)
        return [replies[key] for key in keys]

    # ---- one request at a time ----

    def _ask_direct(self, key: str, request: dict) -> Reply:
        self.ledger.check(self.settings["budget_usd"], self.worst_case_cost(request))
        started = time.monotonic()
        try:
            message = self.client.messages.create(**request)
        except PER_REQUEST_ERRORS as e:
            return Reply(key=key, error=f"{e.status_code}: {_error_message(e)}")
        except anthropic.APIStatusError as e:
            raise ExplainerError(f"claude API error {e.status_code} after retries: {_error_message(e)}") from e
        except anthropic.APIConnectionError as e:
            raise ExplainerError(f"claude API unreachable after retries: {e}") from e
        return self._store(key, request, message.model_dump(mode="json"), batch=False,
                           seconds=time.monotonic() - started)

    # ---- the Message Batches API ----

    def _ask_batch(self, missing: dict[str, dict]) -> dict[str, Reply]:
        """Submit the missing requests as one batch (or find the batch a killed job submitted), wait for it,
        store every reply. Expired or canceled entries stop the job after the others are stored."""
        state = self._pending_batch(set(missing))
        if state is not None:
            batch_id = json.loads(state.read_text())["id"]
        else:
            state = self.batch_folder / f"{request_key(sorted(missing))}.json"
            self.ledger.check(self.settings["budget_usd"], sum(map(self.worst_case_cost, missing.values())))
            try:
                batch = self.client.messages.batches.create(
                    requests=[{"custom_id": key, "params": request} for key, request in missing.items()])
            except anthropic.APIError as e:
                raise ExplainerError(f"claude batch could not be submitted: {_error_message(e)}") from e
            batch_id = batch.id
            write_json(state, {"id": batch_id, "keys": sorted(missing)})
        try:
            while self.client.messages.batches.retrieve(batch_id).processing_status != "ended":
                self.sleep(self.settings["batch_poll_s"])
            results = list(self.client.messages.batches.results(batch_id))
        except anthropic.APIError as e:
            raise ExplainerError(f"claude batch {batch_id} could not be read: {_error_message(e)}") from e
        replies, lost = {}, []
        for item in results:
            key, result = item.custom_id, item.result
            if key not in missing:
                continue
            if result.type == "succeeded":
                replies[key] = self._store(key, missing[key], result.message.model_dump(mode="json"), batch=True)
            elif result.type == "errored":
                error = result.error.error
                replies[key] = Reply(key=key, error=f"{error.type}: {error.message}")
            else:
                lost.append(result.type)
        state.unlink(missing_ok=True)
        lost += ["missing"] * (len(missing) - len(replies) - len(lost))
        if lost:
            raise ExplainerError(f"claude batch {batch_id}: {len(lost)} request(s) {', '.join(sorted(set(lost)))}; "
                                 "rerun to ask them again (the other replies are cached)")
        return replies

    def _pending_batch(self, keys: set[str]) -> Path | None:
        """The state file of a batch submitted earlier (by a job that was killed) holding all these requests."""
        for state in sorted(self.batch_folder.glob("*.json")):
            try:
                if keys <= set(json.loads(state.read_text())["keys"]):
                    return state
            except (ValueError, KeyError):
                continue
        return None

    # ---- replies ----

    def _store(self, key: str, request: dict, message: dict, batch: bool, seconds: float = 0.0) -> Reply:
        """seconds: how long the request took (0 for a batch's, which waited with the others)."""
        usage = message.get("usage") or {}
        dollars = cost_usd(usage, self.prices, batch=batch, batch_discount=self.settings["batch_discount"])
        record = {"backend": self.backend, "request": request, "message": message, "batch": batch,
                  "cost_usd": dollars, "time": time.time(), "seconds": seconds}
        # The reply is paid for: cache it before anything else can go wrong.
        self.cache.put(key, record)
        reply = self._reply(key, record, from_cache=False)
        self.ledger.record(key, dollars, {k: v for k, v in reply.usage().items() if k != "cost_usd"})
        return reply

    @staticmethod
    def _reply(key: str, record: dict, from_cache: bool) -> Reply:
        message, usage = record["message"], record["message"].get("usage") or {}
        text = "".join(block.get("text", "") for block in message.get("content", []) if block.get("type") == "text")
        return Reply(key=key, text=text, stop_reason=message.get("stop_reason"),
                     input_tokens=usage.get("input_tokens") or 0, output_tokens=usage.get("output_tokens") or 0,
                     cache_read_tokens=usage.get("cache_read_input_tokens") or 0,
                     cache_write_tokens=usage.get("cache_creation_input_tokens") or 0,
                     cost_usd=record["cost_usd"], from_cache=from_cache, seconds=record.get("seconds", 0.0))


def _error_message(error: Exception) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and detail.get("message"):
            return str(detail["message"])
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def check_api_key() -> None:
    """Fail at start-up, before any job runs, when the API key is missing."""
    if not os.environ.get(API_KEY_VARIABLE):
        raise ExplainerError(f"{API_KEY_VARIABLE} is not set: the claude synthesis backend needs an Anthropic API "
                             f"key (export {API_KEY_VARIABLE}=...), or choose synthesis.backend: offline")
