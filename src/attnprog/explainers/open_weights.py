"""Any Hugging Face chat model as the explainer (e.g. a code model on a GPU node), with the same prompts,
parsing and reply cache as the Claude backend. Token counts are recorded; the dollar cost is zero.

The model is loaded on the first request that is not already cached, so a rerun answered from the cache
never loads it. Greedy decoding by default, so the same prompt gives the same programs. Each reply keeps
its key-value cache, so the next request re-reads only what follows their common start: the refinement turn
re-sends the whole first turn, and every turn starts with the same system prompt.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from attnprog.explainers.cache import ReplyCache, request_key
from attnprog.explainers.reply import Conversation, ExplainerError, Reply


class OpenWeightsExplainer:
    backend = "open_weights"

    def __init__(self, settings: dict, cache_dir: str | os.PathLike | None = None, device: str | None = None):
        self.settings = settings
        self.model_id = settings["model"]
        self.cache = ReplyCache(Path(cache_dir or settings["cache_dir"]))
        self.device = device or settings["device"]
        self._model = self._tokenizer = None
        self._last = None  # (token ids of the last sequence generated, its key-value cache)

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            from attnprog.models import resolve_device

            device = resolve_device(self.device)
            dtype = self.settings["dtype"]
            if dtype == "auto":
                dtype = "bfloat16" if device.type == "cuda" else "float32"
            revision = self.settings.get("revision")
            self._tokenizer = load_chat_tokenizer(self.settings)
            self._model = AutoModelForCausalLM.from_pretrained(
                self.model_id, revision=revision, dtype=getattr(torch, dtype)).to(device).eval()
        return self._model, self._tokenizer

    def request(self, conversation: Conversation) -> dict:
        chat = [{"role": "system", "content": conversation.system}] + [
            {"role": m["role"], "content": m["content"]} for m in conversation.messages]
        generation = {k: self.settings[k] for k in ("max_new_tokens", "do_sample", "temperature", "seed")}
        return {"backend": self.backend, "model": self.model_id, "revision": self.settings.get("revision"),
                "messages": chat, "generation": generation}

    def ask_many(self, conversations: list[Conversation]) -> list[Reply]:
        replies = []
        for conversation in conversations:
            request = self.request(conversation)
            key = request_key(request)
            record = self.cache.get(key)
            from_cache = record is not None
            if record is None:
                record = self._generate(request)
                if record["error"] is None:
                    self.cache.put(key, record)
            replies.append(Reply(key=key, text=record["text"], stop_reason=record["stop_reason"],
                                 error=record["error"], error_status=record.get("error_status", "api_error"),
                                 input_tokens=record["input_tokens"], output_tokens=record["output_tokens"],
                                 from_cache=from_cache, seconds=record.get("seconds", 0.0)))
        return replies

    def _generate(self, request: dict) -> dict:
        import torch

        model, tokenizer = self._load()
        messages = request["messages"]
        try:
            inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
        except Exception:  # noqa: BLE001  some templates (Gemma's) refuse a system turn: lead the first user turn with it
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            inputs = tokenizer.apply_chat_template(merged + messages[2:], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
        inputs = inputs.to(model.device)
        n_prompt = inputs["input_ids"].shape[1]
        generation = request["generation"]
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and n_prompt + generation["max_new_tokens"] > limit:
            return {"text": "", "stop_reason": None, "input_tokens": n_prompt, "output_tokens": 0,
                    "error_status": "prompt_too_long",
                    "error": f"{n_prompt} prompt tokens + {generation['max_new_tokens']} new tokens exceed the "
                             f"model's {limit} positions"}
        started = time.monotonic()
        torch.manual_seed(generation["seed"])
        options = {"max_new_tokens": generation["max_new_tokens"], "do_sample": generation["do_sample"],
                   "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                   else tokenizer.eos_token_id, "return_dict_in_generate": True}
        if generation["do_sample"]:
            options["temperature"] = generation["temperature"]
        reused = self._reusable_prefix(inputs["input_ids"])
        if reused:
            options["cache"] = self._last[1]
        with torch.inference_mode():
            output = model.generate(**inputs, **options)
        self._last = (output.sequences, output.cache)
        new = output.sequences[0, n_prompt:]
        stop = "end_turn" if len(new) < generation["max_new_tokens"] else "max_tokens"
        return {"backend": self.backend, "request": request, "time": time.time(),
                "text": tokenizer.decode(new, skip_special_tokens=True), "stop_reason": stop,
                "input_tokens": n_prompt, "output_tokens": int(len(new)), "error": None,
                "seconds": time.monotonic() - started, "prompt_tokens_reused": reused}

    def _reusable_prefix(self, ids) -> int:
        """How many leading tokens of `ids` the last reply's key-value cache holds (cropped to them); 0 if none.
        At least the last prompt token is always computed anew: generation starts from its logits."""
        if self._last is None:
            return 0
        previous, cache = self._last
        n = min(previous.shape[1], ids.shape[1] - 1, cache.get_seq_length())
        same = (previous[0, :n] == ids[0, :n].to(previous.device)).int()
        n = int(same.cumprod(0).sum()) if n > 0 else 0
        if n == 0:
            return 0
        cache.crop(n - cache.get_seq_length())  # (transformers 5: the number of tokens to remove, negative)
        return n


def load_chat_tokenizer(settings: dict):
    """The explainer's tokenizer; ExplainerError (one line) if it cannot be loaded or has no chat template.
    Also the start-up check of the open-weights backend, so a wrong model name fails before any job runs."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings["model"], revision=settings.get("revision"))
    except Exception as e:  # noqa: BLE001  (Hub, file and format errors alike)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExplainerError(f"synthesis.open_weights.model {settings['model']!r} cannot be loaded: {first_line}") from e
    if tokenizer.chat_template is None:
        raise ExplainerError(f"synthesis.open_weights.model {settings['model']!r} has no chat template: "
                             "use an instruction-tuned (chat) model")
    return tokenizer
