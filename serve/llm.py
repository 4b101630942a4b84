"""LLMServer: one Serve replica running the continuous-batching engine over a quantized artifact.

Requests stream token ids back (`generate` is an async generator, called through a streaming
deployment handle). The engine runs in a thread of its own that loops without waiting on the event
loop: it takes new and cancelled requests between steps, steps every engine with work, and hands
tokens to the event loop in batches: a request's first token at once, then at most one message per
`serve.stream_interval_ms`, then its finish. Handing over every step instead costs the step thread
the GIL on every token, which here doubled its CPU time per token under load.
`reconfigure({"artifact": path})` loads another model version: new requests go to it, requests in
flight finish on the version they started on, and the old engine is dropped once it is idle.

`generate` yields lists of items, in order: {"version": ...} with the first token, or {"error": ...}
(queue full, or a prompt the engine refuses); then {"token": id} items; then {"finish_reason": ...}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ray import serve

from deepkiln.config import Config, stage_dir
from deepkiln.engine import Engine, Request, SamplingParams

logger = logging.getLogger("ray.serve")


def artifact_path(cfg: Config) -> str:
    return cfg.serve.artifact or f"{stage_dir(cfg, 'quantize')}/{cfg.quant.format}"


def context_length(cfg: Config) -> int:
    return cfg.model.max_seq_len


def version_of(path: str | Path) -> str:
    """A model version's name: the artifact folder, its training step and a prefix of its weights' hash."""
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return f"{Path(path).name}-step{manifest.get('step', 0)}-{manifest['files']['model.safetensors']['sha256'][:8]}"


@dataclass(eq=False)  # identity: a stream is in a list or not
class _Stream:
    """One request in the replica: the engine (model version) it runs on, its engine request once
    admitted, the queue its messages go to, and the items not yet sent (engine thread only)."""
    engine: Engine
    version: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    req: Request | None = None
    sent: int = 0                                     # tokens of req.output already buffered
    buffer: list = field(default_factory=list)
    flushed_at: float | None = None                   # when a token last went out


class LLMServer:
    def __init__(self, config: dict):
        self.cfg = Config.from_dict(config)
        self.engine, self.version = self._load(artifact_path(self.cfg))
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add" | "cancel", stream), ("stop", None)
        self.open = 0          # streams between generate's start and end (event loop)
        self.running = 0       # streams in a batch (written by the engine thread)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.gauges = _gauges()
        self._set_version_gauge(None)

    def _load(self, path: str) -> tuple[Engine, str]:
        from deepkiln.quantize import load_quantized

        version = version_of(path)
        model, _ = load_quantized(path)
        s = self.cfg.serve
        engine = Engine(model, max_batch=s.max_batch, max_len=context_length(self.cfg),
                        max_step_tokens=s.max_step_tokens or None)
        return engine, version

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's user_config: {"artifact": path} switches versions."""
        path = (user_config or {}).get("artifact") or artifact_path(self.cfg)
        if version_of(path) != self.version:
            old = self.version
            self.engine, self.version = await asyncio.to_thread(self._load, path)
            self._set_version_gauge(old)

    def _set_version_gauge(self, old: str | None) -> None:
        if self.gauges:
            if old:
                self.gauges["version"].set(0, tags={"version": old})
            self.gauges["version"].set(1, tags={"version": self.version})

    def info(self) -> dict:
        """What this replica serves: version, process, load, and the layer types and bytes of its weights."""
        from deepkiln.quantize import model_bytes

        layers = Counter(type(m).__name__ for m in self.engine.model.modules() if not list(m.children()))
        return {"version": self.version, "pid": os.getpid(), "queued": self.queued(), "running": self.running,
                "layers": dict(layers), "weight_bytes": model_bytes(self.engine.model)}

    def queued(self) -> int:
        return max(self.open - self.running, 0)

    def __del__(self):  # Serve calls it when the replica stops; ends the engine thread
        if getattr(self, "thread", None) is not None:
            self.inbox.put(("stop", None))

    async def generate(self, prompt: list[int], params: dict):
        if self.thread is None:
            self.loop = asyncio.get_running_loop()
            self.thread = threading.Thread(target=self._engine_main, name="engine", daemon=True)
            self.thread.start()
        if self.queued() >= self.cfg.serve.max_queue:
            yield [{"error": "queue_full", "message": f"the replica's queue is full: {self.queued()} requests "
                    f"wait (serve.max_queue={self.cfg.serve.max_queue})"}]
            return
        stream = _Stream(self.engine, self.version, list(prompt), SamplingParams(**params))
        self.open += 1
        self.inbox.put(("add", stream))
        final = False
        try:
            while not final:
                items = await stream.queue.get()
                while not stream.queue.empty():
                    items += stream.queue.get_nowait()
                final = _final(items[-1])
                yield items
        finally:  # finished, or the caller went away (disconnect, timeout): free the slot now
            self.open -= 1
            if not final:
                self.inbox.put(("cancel", stream))

    # -- the engine thread -------------------------------------------------------------------------

    def _engine_main(self) -> None:
        """The engine thread. If its loop fails outside a step (a bug), every request it holds or
        that waits in the inbox gets an internal error at once, and the next request starts a new
        loop: nobody waits for a timeout on a thread that is gone."""
        streams: list[_Stream] = []
        try:
            self._engine_loop(streams)
        except Exception as e:
            logger.exception("the engine loop failed")
            self.thread = None
            while True:
                try:
                    command, stream = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if command == "add":
                    streams.append(stream)
            error = {"error": "internal", "message": f"the replica's engine loop failed: {e!r}"}
            self._post([(x, [error]) for x in streams])

    def _engine_loop(self, streams: list[_Stream]) -> None:
        s = self.cfg.serve
        torch.set_num_threads(s.torch_threads or max(1, int(s.replica_cpus)))  # per thread, under OpenMP
        interval = s.stream_interval_ms / 1000
        made, since = 0, time.monotonic()
        while True:
            if not self._take(streams, block=not streams):
                return
            for engine in _engines(streams):
                mine = [x for x in streams if x.engine is engine]
                try:
                    engine.step()
                except Exception as e:  # a failed step fails its requests, not the replica
                    for x in mine:
                        engine.cancel(x.req)
                        x.buffer.append({"error": "internal", "message": f"generation failed: {e!r}"})
                    continue
                for x in mine:
                    made += len(x.req.output) - x.sent
                    x.buffer += [{"token": t} for t in x.req.output[x.sent:]]
                    x.sent = len(x.req.output)
                    if x.req.done:
                        x.buffer.append({"finish_reason": x.req.finish_reason})
            now, out, left = time.monotonic(), [], []
            for x in streams:
                if x.buffer and (_final(x.buffer[-1]) or x.flushed_at is None and len(x.buffer) > 1
                                 or x.flushed_at is not None and now - x.flushed_at >= interval):
                    out.append((x, x.buffer))
                    x.buffer, x.flushed_at = [], now
                    if _final(out[-1][1][-1]):
                        continue
                left.append(x)
            streams[:] = left
            self.running = sum(len(e.running) for e in _engines(streams))
            if out and not self._post(out):
                return
            if self.gauges and now - since >= 1.0:
                self._set_load_gauges(made / (now - since))
                made, since = 0, now

    def _post(self, out: list) -> bool:
        """Hand (stream, items) pairs to the event loop; False once that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(_deliver, out)
        except RuntimeError:  # the loop closed (the replica or a test's asyncio.run ended)
            return False
        return True

    def _take(self, streams: list[_Stream], block: bool) -> bool:
        """Apply the commands waiting in the inbox (wait for one if `block`); False on "stop"."""
        while True:
            try:
                command, stream = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command == "stop":
                return False
            if command == "add":
                streams.append(stream)  # first: if add fails unexpectedly, _engine_main answers it too
                try:
                    stream.req = stream.engine.add(stream.prompt, stream.params)
                except ValueError as e:
                    streams.remove(stream)
                    if not self._post([(stream, [{"error": "invalid_request", "message": str(e)}])]):
                        return False
                    continue
                stream.buffer.append({"version": stream.version})
            elif stream in streams:  # "cancel"
                stream.engine.cancel(stream.req)
                streams.remove(stream)

    def _set_load_gauges(self, tokens_per_s: float) -> None:
        self.gauges["queue"].set(self.queued())
        self.gauges["batch"].set(self.running)
        self.gauges["tokens_per_s"].set(tokens_per_s)


def _engines(streams: list[_Stream]) -> list[Engine]:
    """The engines (model versions) these streams run on, each once."""
    return list({id(x.engine): x.engine for x in streams}.values())


def _deliver(out: list) -> None:
    """On the event loop: put each stream's batch of items on its queue."""
    for stream, items in out:
        stream.queue.put_nowait(items)


def _final(item: dict) -> bool:
    return "finish_reason" in item or "error" in item


def _gauges() -> dict | None:
    """Prometheus gauges of this replica (through Ray's metrics agent); None outside Ray."""
    import ray
    from ray.util.metrics import Gauge

    if not ray.is_initialized():
        return None
    return {"queue": Gauge("deepkiln_serve_queue_depth", "requests waiting for a batch slot"),
            "batch": Gauge("deepkiln_serve_batch_size", "requests in the running batch"),
            "tokens_per_s": Gauge("deepkiln_serve_tokens_per_s", "tokens generated per second, over the last second"),
            "version": Gauge("deepkiln_serve_model_version", "1 for the model version being served",
                             tag_keys=("version",))}


LLMServerDeployment = serve.deployment(LLMServer, name="LLMServer")
