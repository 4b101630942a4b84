"""LLMServer: one Serve replica serving a quantized artifact with the continuous-batching engine.

The engine runs in a process of the replica's own (serve/engine_process.py), so that its step loop
and this process's event loop never wait for each other's GIL. The replica keeps the requests'
queues: `generate(prompts, params, n)` (an async generator, called through a streaming deployment
handle) adds a request of len(prompts) x n choices whole, or refuses it whole with a
Failed(queue_full) when it would overfill serve.max_queue, before anything runs; then it yields the
lists of serve/protocol.py's stream items that come back, in order: Started, Tokens and Finished,
or Failed. A new model version comes as a new replica (pipelines.online redeploys the app). With
`serve.response_cache` on, a finished deterministic generation (greedy, or seeded) is kept, keyed on
version, prompts, sampling parameters and n, and answered again without the engine. If the engine
process dies, every request it held gets an internal error at once and the next request starts a
new one. Load gauges follow every change (zero when idle); the version gauge is set from the start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from multiprocessing.connection import Connection

from ray import serve

from deepkiln.config import Config
from deepkiln.sampling import SamplingParams
from deepkiln.paths import RunPaths
from serve.protocol import (INTERNAL, QUEUE_FULL, Add, Cancel, Failed, Finished, Items, Loaded, Start, Started,
                            Stats, Stop, is_final)

logger = logging.getLogger("ray.serve")
START_TIMEOUT_S = 600  # a large artifact can take minutes to load


def context_length(cfg: Config) -> int:
    return cfg.model.max_seq_len


class EngineFailed(RuntimeError):
    pass


class LLMServer:
    def __init__(self, config: dict):
        self.cfg = Config.from_dict(config)
        self.artifact = RunPaths.of(self.cfg).artifact
        self.streams: dict[int, asyncio.Queue] = {}  # open requests' queues, by stream id
        self.choices: dict[int, int] = {}            # open requests' choices, by stream id
        self.ids = itertools.count()
        self.running = self.engine_waiting = 0       # the engine's load, as it last said
        self.loop: asyncio.AbstractEventLoop | None = None
        self.send_lock = threading.Lock()
        self.cache: OrderedDict[str, list] = OrderedDict()  # response cache: key -> every item, LRU order
        self.cache_hits = 0
        self.gauges = _gauges()
        self.proc = None
        self.restart: asyncio.Future | None = None
        self._start()
        self._set_load_gauges(0.0)

    # -- the engine process ------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the engine process on self.artifact and wait until it has loaded it (blocking)."""
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.engine_process", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.reader = None
        self._send(Start(self.cfg.to_dict(), self.artifact))
        if not self.conn.poll(START_TIMEOUT_S):
            self.proc.kill()
            raise EngineFailed(f"the engine process did not load {self.artifact} in {START_TIMEOUT_S} s")
        try:
            message = self.conn.recv()
        except EOFError:
            raise EngineFailed(f"the engine process exited while loading {self.artifact} "
                               f"(code {self.proc.wait()}); its error is in this replica's log") from None
        if not isinstance(message, Loaded):
            raise EngineFailed(f"the engine process could not load {message.artifact}: {message.message}")
        self.version, self.layout = message.version, message.info
        self._set_version_gauge(None)

    async def _ensure_engine(self) -> None:
        """The reader of the engine process's messages runs on this event loop; a dead engine
        process is replaced (in a thread: loading takes a while)."""
        self.loop = asyncio.get_running_loop()
        if self.proc is None:  # one restart, however many requests wait for it
            self.restart = self.restart or asyncio.ensure_future(asyncio.to_thread(self._start))
            try:
                await asyncio.shield(self.restart)
            finally:
                if self.restart.done():
                    self.restart = None
        if self.reader is None:
            self.reader = threading.Thread(target=self._read, args=(self.conn, self.loop), name="engine-reader",
                                           daemon=True)
            self.reader.start()

    def _send(self, message) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """A thread: hand each message of the engine process to the event loop; on its end, fail
        what it held."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = None
            try:
                loop.call_soon_threadsafe(self._on_message, conn, message)
            except RuntimeError:  # the loop closed (a test's asyncio.run ended): stop the engine
                self._stop(conn)
                return
            if message is None:
                return

    def _on_message(self, conn: Connection, message) -> None:
        if isinstance(message, Items):
            self.running, self.engine_waiting = message.running, message.waiting
            for sid, items in message.batches:
                if sid in self.streams:
                    self.streams[sid].put_nowait(list(items))
            self._set_load_gauges()
        elif isinstance(message, Stats):
            self.running, self.engine_waiting = message.running, message.waiting
            self._set_load_gauges(message.tokens_per_s)
        elif message is None and conn is self.conn:
            code = self.proc.wait()
            if getattr(self, "stopping", False):  # this replica asked it to stop: it is going away
                return
            logger.error(f"the engine process exited with code {code}; the next request starts a new one")
            self.proc, self.reader, self.running, self.engine_waiting = None, None, 0, 0
            failed = Failed(INTERNAL, f"the replica's engine process exited (code {code})")
            for q in self.streams.values():
                q.put_nowait([failed])
            self._set_load_gauges()

    def _stop(self, conn: Connection) -> None:
        try:
            with self.send_lock:
                conn.send(Stop())
        except OSError:
            pass

    def __del__(self):  # Serve calls it when the replica stops; the engine process ends too
        if getattr(self, "proc", None) is not None:
            self.stopping = True
            self._stop(self.conn)

    # -- requests ----------------------------------------------------------------------------------

    def info(self) -> dict:
        """What this replica serves: version, processes, load, and the layer types and bytes of its weights."""
        return {"version": self.version, "pid": os.getpid(), "engine_pid": self.proc.pid if self.proc else None,
                "queued": self.queued(), "running": self.running, "cache_entries": len(self.cache),
                "cache_hits": self.cache_hits, **self.layout}

    def queued(self) -> int:
        """Choices accepted by this replica and not decoding yet."""
        return max(sum(self.choices.values()) - self.running, 0)

    async def generate(self, prompts: tuple[tuple[int, ...], ...], params: SamplingParams, n: int = 1):
        version = self.version
        key = self._cache_key(version, prompts, params, n)
        if key in self.cache:
            self.cache.move_to_end(key)
            self.cache_hits += 1
            if self.gauges:
                self.gauges["cache_hits"].inc()
            yield list(self.cache[key])
            return
        await self._ensure_engine()
        need, limit = len(prompts) * n, self.cfg.serve.max_queue
        if self.queued() + need > limit:
            yield [Failed(QUEUE_FULL, f"the replica's queue is full: {self.queued()} choices wait and this request "
                                      f"has {need} (serve.max_queue={limit})")]
            return
        sid, queue = next(self.ids), asyncio.Queue()
        self.streams[sid], self.choices[sid] = queue, need
        self._set_load_gauges()
        final, seen = False, []
        try:
            self._send(Add(sid, tuple(map(tuple, prompts)), params, n))
            while not final:
                items = await queue.get()  # one engine message (the engine process batches by stream interval)
                final = is_final(items[-1])
                seen += items
                yield items
            if key and isinstance(seen[-1], Finished) and isinstance(seen[0], Started) and seen[0].version == version:
                self.cache[key] = seen
                if len(self.cache) > self.cfg.serve.response_cache:
                    self.cache.popitem(last=False)
        finally:  # finished, or the caller went away (disconnect, timeout): free the slots now
            del self.streams[sid], self.choices[sid]
            if not final and self.proc is not None:
                self._send(Cancel(sid))
            self._set_load_gauges()

    def _cache_key(self, version: str, prompts, params: SamplingParams, n: int) -> str | None:
        """The response cache's key for a deterministic request on `version`; None when the cache
        is off or the request samples without a seed."""
        if not self.cfg.serve.response_cache or (not params.greedy and params.seed is None):
            return None
        return json.dumps([version, [list(p) for p in prompts], dataclasses.asdict(params), n], sort_keys=True,
                          default=list)

    # -- metrics -----------------------------------------------------------------------------------

    def _set_version_gauge(self, old: str | None) -> None:
        if self.gauges:
            if old:
                self.gauges["version"].set(0, tags={"version": old})
            self.gauges["version"].set(1, tags={"version": self.version})

    def _set_load_gauges(self, tokens_per_s: float | None = None) -> None:
        if self.gauges:
            self.gauges["queue"].set(self.queued())
            self.gauges["batch"].set(self.running)
            if tokens_per_s is not None:
                self.gauges["tokens_per_s"].set(tokens_per_s)


def _gauges() -> dict | None:
    """Prometheus gauges of this replica (through Ray's metrics agent); None outside Ray."""
    import ray
    from ray.util.metrics import Counter, Gauge

    if not ray.is_initialized():
        return None
    return {"queue": Gauge("deepkiln_serve_queue_depth", "choices waiting for a batch slot"),
            "batch": Gauge("deepkiln_serve_batch_size", "choices in the running batch"),
            "tokens_per_s": Gauge("deepkiln_serve_tokens_per_s", "tokens generated per second, over the last second"),
            "cache_hits": Counter("deepkiln_serve_response_cache_hits", "requests answered from the response cache"),
            "version": Gauge("deepkiln_serve_model_version", "1 for the model version being served",
                             tag_keys=("version",))}


LLMServerDeployment = serve.deployment(LLMServer, name="LLMServer")
