"""The engine process of an LLMServer replica: the continuous-batching engine runs here, in a process
of its own, started by the replica (serve/llm.py), never by hand.

Why a process: the engine's step loop is Python-heavy (hundreds of small ops a step) and, in the
replica's process, shared the GIL with Serve's event loop and Ray's callbacks. Measured in a
replica at 16 concurrent requests, a step then took 1.6x its own CPU time in wall time, waiting for
the GIL. Here the loop has a GIL of its own; the replica only moves small pickled tuples.

It loops without waiting on anyone: between steps it takes new and cancelled requests, steps every
engine (model version) with work, and sends tokens in batches: a request's first token at once, then
at most one message per `serve.stream_interval_ms`, then its finish. A model version is loaded in a
thread while the current one keeps decoding; requests in flight finish on the version they started
on, and an old version is dropped once it is idle. When the replica goes away (its end of the socket
closes), the process exits.

Messages, pickled tuples over one socket pair:
  replica -> engine  ("start", config, path) first, then ("load", path) | ("add", sid, prompt, params)
                     | ("cancel", sid) | ("stop",)
  engine -> replica  ("loaded", version, info) | ("load_failed", path, message)
                     | ("items", running, [(sid, [item, ...]), ...]) | ("stats", tokens_per_s)
Items, in order per request: {"version": v} with the first token, or {"error": kind, "message": m};
then {"token": id} items; then {"finish_reason": r}. Kinds: "invalid_request" (a prompt the engine
refuses), "internal" (a failed step).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from deepkiln.config import Config
from deepkiln.engine import Engine, Request, SamplingParams
from deepkiln.paths import RunPaths, version_of

POLL_S = 0.05  # how often an idle loop looks for a finished model load


def load_engine(cfg: Config, path: str) -> tuple[str, Engine, dict]:
    """The artifact at `path` as (version, engine, info): info names its layer types, weight bytes and
    compute dtype (serve.dtype, resolved here, on the replica's own machine).
    The engine never samples an id the served tokenizer cannot decode."""
    from deepkiln.precision import compute_dtype, dtype_name
    from deepkiln.quantize import load_quantized, model_bytes
    from deepkiln.tokenizer import Tokenizer

    version = version_of(path)
    dtype = compute_dtype(cfg.serve.dtype)
    model, _ = load_quantized(path, dtype)
    s = cfg.serve
    engine = Engine(model, max_batch=s.max_batch, max_len=cfg.model.max_seq_len, max_step_tokens=s.max_step_tokens or None,
                    vocab_size=Tokenizer.load(RunPaths.of(cfg).tokenizer_model).vocab_size)
    layers = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    return version, engine, {"layers": dict(layers), "weight_bytes": model_bytes(model), "dtype": dtype_name(dtype)}


@dataclass(eq=False)
class _Stream:
    """One request: the engine (model version) it runs on, its engine request, and the items not
    yet sent."""
    sid: int
    engine: Engine
    req: Request
    sent: int = 0                                     # tokens of req.output already buffered
    buffer: list = field(default_factory=list)
    flushed_at: float | None = None                   # when a token last went out


class EngineLoop:
    def __init__(self, conn: Connection, cfg: Config, path: str):
        self.conn, self.cfg = conn, cfg
        self.version, self.engine, info = load_engine(cfg, path)
        self.engines = {self.version: self.engine}    # every version with requests, and the current one
        self.streams: list[_Stream] = []
        self.loads: queue.SimpleQueue = queue.SimpleQueue()  # results of loader threads
        self.conn.send(("loaded", self.version, info))

    def run(self) -> None:
        s = self.cfg.serve
        interval = s.stream_interval_ms / 1000
        made, since = 0, time.monotonic()
        while True:
            idle = not self.streams
            if not self._take(block=idle):
                return
            if idle:  # tokens/s counts busy time only
                made, since = 0, time.monotonic()
            for engine in list(self.engines.values()):
                made += self._step(engine)
            now = time.monotonic()
            self._flush(now, interval)
            for version in [v for v, e in self.engines.items() if e is not self.engine]:
                if not any(x.engine is self.engines[version] for x in self.streams):
                    del self.engines[version]         # an old version, idle: drop it
            if now - since >= 1.0 or not self.streams:  # every second, and on going idle
                self.conn.send(("stats", made / max(now - since, 1e-6)))
                made, since = 0, now

    def _step(self, engine: Engine) -> int:
        """One step of `engine`; its streams' new tokens and finishes go to their buffers. A failed
        step fails its requests, not the process. Returns the tokens made."""
        mine = [x for x in self.streams if x.engine is engine]
        if not mine:
            return 0
        try:
            engine.step()
        except Exception as e:
            for x in mine:
                engine.cancel(x.req)
                x.buffer.append({"error": "internal", "message": f"generation failed: {e!r}"})
            return 0
        made = 0
        for x in mine:
            made += len(x.req.output) - x.sent
            x.buffer += [{"token": t} for t in x.req.output[x.sent:]]
            x.sent = len(x.req.output)
            if x.req.done:
                x.buffer.append({"finish_reason": x.req.finish_reason})
        return made

    def _flush(self, now: float, interval: float) -> None:
        """Send what is due: a first token at once, a finish at once, the rest every `interval`."""
        out, left = [], []
        for x in self.streams:
            if x.buffer and (_final(x.buffer[-1]) or x.flushed_at is None and len(x.buffer) > 1
                             or x.flushed_at is not None and now - x.flushed_at >= interval):
                out.append((x.sid, x.buffer))
                x.buffer, x.flushed_at = [], now
                if _final(out[-1][1][-1]):
                    continue
            left.append(x)
        self.streams = left
        if out:
            self.conn.send(("items", self.running(), out))

    def running(self) -> int:
        return sum(len(e.running) for e in self.engines.values())

    def _take(self, block: bool) -> bool:
        """Apply the replica's waiting commands and finished loads (wait for one if `block`);
        False on "stop"."""
        while True:
            self._install_loads()
            if not self.conn.poll(POLL_S if block else 0):
                if block:
                    continue
                return True
            block = False
            command, *args = self.conn.recv()         # EOFError once the replica is gone
            if command == "stop":
                return False
            if command == "add":
                self._add(*args)
            elif command == "cancel":
                for x in self.streams:
                    if x.sid == args[0]:
                        x.engine.cancel(x.req)
                        self.streams.remove(x)
                        break
            elif command == "load":
                threading.Thread(target=self._load, args=args, daemon=True).start()

    def _add(self, sid: int, prompt: list[int], params: dict) -> None:
        try:
            req = self.engine.add(prompt, SamplingParams(**params))
        except ValueError as refused:
            self.conn.send(("items", self.running(), [(sid, [{"error": "invalid_request", "message": str(refused)}])]))
            return
        self.streams.append(_Stream(sid, self.engine, req, buffer=[{"version": self.version}]))

    def _load(self, path: str) -> None:
        """In a thread: load a version while the loop decodes; the loop installs it."""
        try:
            self.loads.put((path, load_engine(self.cfg, path)))
        except Exception as e:
            self.loads.put((path, e))

    def _install_loads(self) -> None:
        while True:
            try:
                path, result = self.loads.get_nowait()
            except queue.Empty:
                return
            if isinstance(result, Exception):
                self.conn.send(("load_failed", path, repr(result)))
                continue
            self.version, self.engine, info = result
            self.engines[self.version] = self.engine
            self.conn.send(("loaded", self.version, info))


def _final(item: dict) -> bool:
    return "finish_reason" in item or "error" in item


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    conn = Connection(int(argv[0]))
    command, config, path = conn.recv()
    assert command == "start", command
    cfg = Config.from_dict(config)
    s = cfg.serve
    torch.set_num_threads(s.torch_threads or max(1, int(s.replica_cpus)))
    try:
        loop = EngineLoop(conn, cfg, path)
    except Exception as e:
        conn.send(("load_failed", path, repr(e)))
        raise
    try:
        loop.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the replica is gone


if __name__ == "__main__":
    main()
