"""The typed messages between the engine process, the LLMServer replica and the ingress.

    replica -> engine process    Start, Add, Cancel, Stop
    engine process -> replica    Loaded, LoadFailed, Items, Stats
    stream items (engine process -> replica -> ingress, per request, in order):
        Started (the model version, with the first tokens), then Tokens per choice, then Finished
        per choice; or Failed at any point. `is_final(item)`: nothing follows it.

Frozen dataclasses, pickled over the replica's socket and through Serve's handles: a field added
here is added for every side at once, and a message is never a dict read by key.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepkiln.sampling import SamplingParams

# Failure kinds: what the ingress turns into an HTTP status.
QUEUE_FULL, INVALID, INTERNAL = "queue_full", "invalid_request", "internal"


# -- replica -> engine process ----------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    config: dict
    artifact: str


@dataclass(frozen=True)
class Add:
    """A request of n choices per prompt, added (or refused) whole; choice p * n + j is prompt p's j-th."""
    sid: int
    prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams
    n: int = 1

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class Cancel:
    sid: int


@dataclass(frozen=True)
class Stop:
    pass


# -- engine process -> replica ----------------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    version: str
    info: dict


@dataclass(frozen=True)
class LoadFailed:
    artifact: str
    message: str


@dataclass(frozen=True)
class Items:
    """New stream items of several requests: ((sid, (item, ...)), ...), and the engine's load
    (requests decoding, requests waiting for a slot)."""
    batches: tuple[tuple[int, tuple], ...]
    running: int
    waiting: int


@dataclass(frozen=True)
class Stats:
    tokens_per_s: float
    running: int
    waiting: int


# -- stream items -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Started:
    """First item of a stream: the model version that answers."""
    version: str


@dataclass(frozen=True)
class Tokens:
    """New tokens of choice `index`; with params.logprobs, ((logprob, ((id, logprob), ...)), ...)
    per token; the choice's first Tokens carries the prompt's own when asked (echo with logprobs):
    (None, (logprob, alternatives), ...) per prompt token."""
    index: int
    ids: tuple[int, ...]
    logprobs: tuple | None = None
    prompt_logprobs: tuple | None = None


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str        # "stop" | "length"
    last: bool         # every choice of the request has finished


@dataclass(frozen=True)
class Failed:
    kind: str          # QUEUE_FULL | INVALID | INTERNAL
    message: str


def is_final(item) -> bool:
    return isinstance(item, Failed) or (isinstance(item, Finished) and item.last)
