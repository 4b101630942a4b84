"""A request's sampling parameters: plain data (no torch), built by the HTTP ingress from a request
body (serve/schemas.py) and carried to the engine process (serve/protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (as vLLM does): dividing logits by 1e-40 gives inf and NaN."""
MAX_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's top_logprobs limit)."""


@dataclass
class SamplingParams:
    max_tokens: int = 64
    """New tokens to generate at most."""
    temperature: float = 1.0
    """0 (or below GREEDY_BELOW) is greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends at any of these; the stop token is not returned."""
    seed: int | None = None
    """Seeds this request's own generator: the same seed gives the same tokens in any batch."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's definition)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the named tokens' logits before sampling (-100 bans a token, +100 forces it)."""
    logprobs: int | None = None
    """Record each generated token's log-probability and this many most likely alternatives."""
    prompt_logprobs: bool = False
    """Record the prompt tokens' log-probabilities too (OpenAI's echo with logprobs); one more forward."""

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not self.temperature >= 0:  # NaN fails too
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be in 0..{MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)
