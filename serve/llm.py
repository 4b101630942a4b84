"""LLMServer: one Serve replica running the continuous-batching engine over a quantized artifact.

Requests stream token ids back (`generate` is an async generator, called through a streaming
deployment handle). One background task per replica steps the engine in a worker thread, so the
event loop keeps accepting requests while a step runs; requests join and leave between steps.
`reconfigure({"artifact": path})` loads another model version: new requests go to it, requests in
flight finish on the version they started on, and the old engine is dropped once it is idle.

`generate` yields lists of items, in order: {"version": ...} once the request is queued, or
{"error": ...} (queue full, or a prompt the engine refuses); then {"token": id} items; then
{"finish_reason": ...}. A list holds every item that was ready when the caller asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ray import serve

from deepkiln.config import Config, stage_dir
from deepkiln.engine import Engine, Request, SamplingParams


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
    admitted, and the queue its tokens go to."""
    engine: Engine
    version: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    req: Request | None = None
    sent: int = 0


class LLMServer:
    def __init__(self, config: dict):
        self.cfg = Config.from_dict(config)
        torch.set_num_threads(max(1, int(self.cfg.serve.replica_cpus)))
        self.engine, self.version = self._load(artifact_path(self.cfg))
        self.streams: list[_Stream] = []    # admitted to an engine, not finished
        self.pending: list[_Stream] = []    # to add to their engine before the next step
        self.cancelled: list[_Stream] = []  # to take out of their engine before the next step
        self.wake = asyncio.Event()
        self.runner: asyncio.Task | None = None
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
        return {"version": self.version, "pid": os.getpid(), "queued": self.queued(),
                "running": sum(len(e.running) for e in self._engines()), "layers": dict(layers),
                "weight_bytes": model_bytes(self.engine.model)}

    def queued(self) -> int:
        return len(self.pending) + sum(len(e.waiting) for e in self._engines())

    def _engines(self) -> list[Engine]:
        """The current engine and any older version still finishing requests."""
        return list({id(e): e for e in [self.engine, *(s.engine for s in self.streams)]}.values())

    async def generate(self, prompt: list[int], params: dict):
        if self.runner is None or self.runner.done():
            self.runner = asyncio.get_running_loop().create_task(self._run())
        if self.queued() >= self.cfg.serve.max_queue:
            yield [{"error": "queue_full", "message": f"the replica's queue is full: {self.queued()} requests "
                    f"wait (serve.max_queue={self.cfg.serve.max_queue})"}]
            return
        stream = _Stream(self.engine, self.version, list(prompt), SamplingParams(**params))
        self.pending.append(stream)
        self.wake.set()
        try:
            while True:
                # Everything queued goes out as one message: under load the consumer falls behind
                # the engine, and one message per token would cost more than the step itself.
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                yield items
                if any("finish_reason" in i or "error" in i for i in items):
                    return
        finally:  # finished, or the caller went away (disconnect, timeout): free the slot now
            if stream.req is None or not stream.req.done:
                self.cancelled.append(stream)
                self.wake.set()

    async def _run(self) -> None:
        while True:
            self._admit()
            busy = [e for e in self._engines() if e.waiting or e.running]
            if not busy:
                self.wake.clear()
                await self.wake.wait()
                continue
            for engine in busy:
                if self.gauges:
                    self.gauges["queue"].set(self.queued())
                    self.gauges["batch"].set(len(engine.running) + min(len(engine.waiting), len(engine.free)))
                start, before = time.perf_counter(), sum(len(r.output) for r in engine.running)
                try:
                    await asyncio.to_thread(engine.step)
                except Exception as e:  # a failed step fails its requests, not the replica
                    for s in [s for s in self.streams if s.engine is engine]:
                        engine.cancel(s.req)
                        s.queue.put_nowait({"error": "internal", "message": f"generation failed: {e!r}"})
                        self.streams.remove(s)
                    continue
                if self.gauges:
                    made = sum(len(s.req.output) for s in self.streams if s.engine is engine) - before
                    self.gauges["tokens_per_s"].set(max(made, 0) / (time.perf_counter() - start))
                self._deliver(engine)

    def _admit(self) -> None:
        for s in self.cancelled:
            if s in self.pending:
                self.pending.remove(s)
            elif s in self.streams:
                s.engine.cancel(s.req)
                self.streams.remove(s)
        self.cancelled.clear()
        for s in self.pending:
            try:
                s.req = s.engine.add(s.prompt, s.params)
            except ValueError as e:
                s.queue.put_nowait({"error": "invalid_request", "message": str(e)})
                continue
            s.queue.put_nowait({"version": s.version})
            self.streams.append(s)
        self.pending.clear()

    def _deliver(self, engine: Engine) -> None:
        for s in [s for s in self.streams if s.engine is engine]:
            for token in s.req.output[s.sent:]:
                s.queue.put_nowait({"token": token})
            s.sent = len(s.req.output)
            if s.req.done:
                s.queue.put_nowait({"finish_reason": s.req.finish_reason})
                self.streams.remove(s)


def _gauges() -> dict | None:
    """Prometheus gauges of this replica (through Ray's metrics agent); None outside Ray."""
    import ray
    from ray.util.metrics import Gauge

    if not ray.is_initialized():
        return None
    return {"queue": Gauge("deepkiln_serve_queue_depth", "requests waiting for a batch slot"),
            "batch": Gauge("deepkiln_serve_batch_size", "requests in the last engine step"),
            "tokens_per_s": Gauge("deepkiln_serve_tokens_per_s", "tokens generated per second in the last step"),
            "version": Gauge("deepkiln_serve_model_version", "1 for the model version being served",
                             tag_keys=("version",))}


LLMServerDeployment = serve.deployment(LLMServer, name="LLMServer")
