"""Request and response bodies of the OpenAI-compatible API, and the table of every request field.

Every field a client may send is either honoured or refused with a 400 naming it; nothing is
silently ignored, and a field OpenAI does not know is refused as OpenAI refuses it ("Unrecognized
request argument supplied: ..."). A request builds its engine SamplingParams itself
(`to_sampling_params`), as vLLM's protocol does.

| field | completions | chat | what deepkiln does |
| --- | --- | --- | --- |
| model | yes | yes | must name the served model (404 otherwise) |
| prompt | str, [str], [int], [[int]] | - | text or token ids; several prompts give n choices each |
| messages | - | yes | roles system/user/assistant; content a string or a list of {"type": "text"} parts |
| max_completion_tokens / max_tokens | yes | yes | max_completion_tokens wins when both are given; up to serve.max_tokens |
| temperature | yes | yes | 0..2; below 1e-5 greedy |
| top_p | yes | yes | (0, 1] |
| n | yes | yes | 1..serve.max_n; admitted whole or refused whole (503) |
| stream, stream_options.include_usage | yes | yes | server-sent events; a usage chunk only when asked |
| stop | yes | yes | up to 4 non-empty strings, per choice |
| seed | yes | yes | -2**63..2**64-1; choice i uses seed + i |
| presence_penalty, frequency_penalty | yes | yes | -2..2, OpenAI's definition, on generated tokens |
| logit_bias | yes | yes | {token id: -100..100}; ids the tokenizer knows |
| logprobs | int 0..5 | bool | the chosen tokens' log-probabilities (and top alternatives) |
| top_logprobs | - | 0..20 | alternatives per token; needs logprobs=true |
| echo | yes | - | the prompt before the completion (with its log-probabilities when asked) |
| user | yes | yes | kept with the completion for feedback |
| best_of | 1 or n | - | more than n: 400 (not implemented) |
| suffix | "" or null | - | anything else: 400 |
| response_format | - | {"type": "text"} | json_object / json_schema: 400 |
| tools, tool_choice, functions, function_call, parallel_tool_calls | - | null | anything else: 400 |
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deepkiln.sampling import MAX_LOGPROBS, SamplingParams

MAX_SEED = 2**64


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default_factory=list)
    seed: int | None = Field(None, ge=-(2**63), lt=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[int, float] | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for token, bias in (v or {}).items():
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} of token {token} is outside [-100, 100]")
        return v

    @property
    def completion_tokens(self) -> int | None:
        """The completion's token budget: max_completion_tokens when given, else max_tokens."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, max_tokens: int, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop_token_ids=stop_token_ids, seed=self.seed, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logit_bias=dict(self.logit_bias or {}),
                              logprobs=self.top_logprob_count, prompt_logprobs=self.wants_prompt_logprobs)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of > self.n:
            raise ValueError("best_of > n is not supported: every generated choice is returned")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported when streaming: ask without stream")
        return self

    @property
    def top_logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: None = None
    tool_choice: Literal["none"] | None = None
    functions: None = None
    function_call: Literal["none"] | None = None
    parallel_tool_calls: None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return False


# Refused request fields: what OpenAI offers and deepkiln does not, named in the 400.
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
               "best_of", "suffix"}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
