"""The engine process of an LLMServer replica: the continuous-batching engine runs here, in a process
of its own, started by the replica (serve/llm.py), never by hand.

Why a process: the engine's step loop is Python-heavy (hundreds of small ops a step) and, in the
replica's process, shared the GIL with Serve's event loop and Ray's callbacks. Measured in a
replica at 16 concurrent requests, a step then took 1.6x its own CPU time in wall time, waiting for
the GIL. Here the loop has a GIL of its own; the replica only moves small pickled messages.

It loops without waiting on anyone: between steps it takes new and cancelled requests, steps every
engine (model version) with work, and sends tokens in batches: a request's first tokens at once,
then at most one message per `serve.stream_interval_ms`, then its finish. A request of several
choices (n, or several prompts) is added whole. A failure stays with the requests it belongs to: a
request whose own parameters break its sampling fails alone, a failed forward fails the requests in
it, and the others go on. It serves one model version, the one it started with (a new version
comes as a new replica). When the replica goes away (its end of the socket closes), the process exits.
The messages are serve/protocol.py's.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from deepkiln.config import Config
from deepkiln.engine import Engine, Request
from deepkiln.paths import tokenizer_of, version_of
from serve.protocol import (INVALID, Add, Cancel, Failed, Finished, Items, Loaded, LoadFailed, Start, Started, Stats,
                            Stop, Tokens, is_final)

logger = logging.getLogger(__name__)


def load_engine(cfg: Config, path: str) -> tuple[str, Engine, dict]:
    """The artifact at `path` as (version, engine, info): info names its layer types, weight bytes and
    compute dtype (serve.dtype, resolved here, on the replica's own machine).
    The engine never samples an id the served tokenizer cannot decode."""
    from deepkiln.precision import compute_dtype, dtype_name
    from deepkiln.quantize import load_quantized, model_bytes
    from deepkiln.tokenizer import load_tokenizer

    version = version_of(path)
    dtype = compute_dtype(cfg.serve.dtype)
    model, _ = load_quantized(path, dtype)
    s = cfg.serve
    engine = Engine(model, max_batch=s.max_batch, max_len=cfg.model.max_seq_len, max_step_tokens=s.max_step_tokens or None,
                    vocab_size=load_tokenizer(tokenizer_of(cfg, path)).vocab_size)
    layers = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    return version, engine, {"layers": dict(layers), "weight_bytes": model_bytes(model), "dtype": dtype_name(dtype)}


@dataclass(eq=False)
class _Stream:
    """One request: its choices' engine requests, and the items not yet sent."""
    sid: int
    reqs: list[Request]
    sent: list[int]                                   # tokens of each choice already buffered
    finished: set[int] = field(default_factory=set)
    buffer: list = field(default_factory=list)
    flushed_at: float | None = None                   # when items last went out


class EngineLoop:
    def __init__(self, conn: Connection, cfg: Config, path: str):
        self.conn, self.cfg = conn, cfg
        self.version, self.engine, info = load_engine(cfg, path)
        self.streams: list[_Stream] = []
        self.load_sent: tuple[int, int] | None = None
        self.conn.send(Loaded(self.version, info))

    def run(self) -> None:
        interval = self.cfg.serve.stream_interval_ms / 1000
        made, since = 0, time.monotonic()
        while True:
            idle = not self.streams
            if not self._take(block=idle):
                return
            if idle:  # tokens/s counts busy time only
                made, since = 0, time.monotonic()
            made += self._step()
            now = time.monotonic()
            self._flush(now, interval)
            # Load gauges on every change (cancellations and going idle included); tokens/s each second.
            if self.load() != self.load_sent or now - since >= 1.0:
                self.load_sent = self.load()
                self.conn.send(Stats(made / max(now - since, 1e-6), *self.load_sent))
                if now - since >= 1.0:
                    made, since = 0, now

    def load(self) -> tuple[int, int]:
        """(requests decoding, requests waiting for a slot)."""
        return len(self.engine.running), len(self.engine.waiting)

    def _step(self) -> int:
        """One engine step; the streams' new tokens and finishes go to their buffers. Returns the
        tokens made."""
        if not self.streams:
            return 0
        engine = self.engine
        try:
            engine.step()
        except Exception:  # a defect of the engine's own bookkeeping, not of a request: start it clean
            logger.exception("an engine step failed outside any forward; its requests fail, the engine is reset")
            engine.abort_all("internal error in the engine")
        return sum(self._collect(x) for x in self.streams)

    def _collect(self, x: _Stream) -> int:
        """Move the new tokens and finishes of stream `x` to its buffer; a failed choice fails the
        whole request (its other choices are cancelled). Returns the tokens moved."""
        made = 0
        for i, r in enumerate(x.reqs):
            if r.finish_reason == "error":
                for other in x.reqs:
                    self.engine.cancel(other)
                x.buffer.append(Failed(*r.error))
                return made
            new = r.output[x.sent[i]:]
            if new:
                logprobs = tuple(r.logprobs[x.sent[i]:]) if r.params.logprobs is not None else None
                prompt = tuple(r.prompt_logprobs) if x.sent[i] == 0 and r.prompt_logprobs is not None else None
                x.buffer.append(Tokens(i, tuple(new), logprobs, prompt))
                made += len(new)
                x.sent[i] = len(r.output)
            if r.done and i not in x.finished:
                x.finished.add(i)
                x.buffer.append(Finished(i, "stop" if r.finish_reason == "stop" else "length",
                                         last=len(x.finished) == len(x.reqs)))
        return made

    def _flush(self, now: float, interval: float) -> None:
        """Send what is due: a request's first items at once, its end at once, the rest every `interval`."""
        out, left = [], []
        for x in self.streams:
            due = x.buffer and (is_final(x.buffer[-1]) or x.flushed_at is None
                                or now - x.flushed_at >= interval)
            if due:
                if x.flushed_at is None and not isinstance(x.buffer[0], Failed):
                    x.buffer.insert(0, Started(self.version))
                out.append((x.sid, tuple(x.buffer)))
                x.buffer, x.flushed_at = [], now
                if is_final(out[-1][1][-1]):
                    continue
            left.append(x)
        self.streams = left
        if out:
            self.conn.send(Items(tuple(out), *self.load()))

    def _take(self, block: bool) -> bool:
        """Apply the replica's waiting messages (wait for one if `block`); False on Stop."""
        while True:
            if not self.conn.poll(None if block else 0):
                return True
            block = False
            message = self.conn.recv()                # EOFError once the replica is gone
            if isinstance(message, Stop):
                return False
            if isinstance(message, Add):
                self._add(message)
            elif isinstance(message, Cancel):
                for x in self.streams:
                    if x.sid == message.sid:
                        for r in x.reqs:
                            self.engine.cancel(r)
                        self.streams.remove(x)
                        break

    def _add(self, add: Add) -> None:
        """Every choice of the request into the engine, or none of them: choice p * n + j is prompt
        p's j-th, seeded with seed + (its index), wrapped to 64 bits."""
        reqs: list[Request] = []
        p = add.params
        try:
            for i, prompt in enumerate(prompt for prompt in add.prompts for _ in range(add.n)):
                seed = None if p.seed is None else (p.seed + i) % 2**64
                reqs.append(self.engine.add(list(prompt), dataclasses.replace(p, seed=seed)))
        except ValueError as refused:
            for r in reqs:
                self.engine.cancel(r)
            self.conn.send(Items(((add.sid, (Failed(INVALID, str(refused)),)),), *self.load()))
            return
        self.streams.append(_Stream(add.sid, reqs, [0] * len(reqs)))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    conn = Connection(int(argv[0]))
    start = conn.recv()
    assert isinstance(start, Start), start
    cfg = Config.from_dict(start.config)
    s = cfg.serve
    torch.set_num_threads(s.torch_threads or max(1, int(s.replica_cpus)))
    try:
        loop = EngineLoop(conn, cfg, start.artifact)
    except Exception as e:
        conn.send(LoadFailed(start.artifact, f"{type(e).__name__}: {e}"))
        raise
    try:
        loop.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the replica is gone


if __name__ == "__main__":
    main()
