"""What every explainer backend shares: a conversation to ask, the reply with its token counts, and the
error that stops a job."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


class ExplainerError(RuntimeError):
    """The explainer cannot be used right now (no key, unknown model, outage): the job must stop."""


@dataclass
class Conversation:
    """A system prompt and alternating user/assistant turns (plain text), ending with a user turn.

    `cache_first_turn` asks the backend to cache the prompt up to the end of the first user turn too (it is
    re-sent with the refinement turn), not only the static system prompt."""
    system: str
    messages: list[dict] = field(default_factory=list)
    cache_first_turn: bool = False


@dataclass
class Reply:
    key: str                      # the request's content hash (the manifest's prompt_hash)
    text: str = ""
    stop_reason: str | None = None
    error: str | None = None      # a failure of this one request (no text), reported per candidate
    error_status: str = "api_error"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    from_cache: bool = False      # read back from the reply cache: cost nothing this time
    seconds: float = 0.0          # how long the reply took when it was generated (also when read from the cache)

    def usage(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd")}
