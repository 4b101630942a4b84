"""LLMServer: one Serve replica serving a quantized artifact with the continuous-batching engine.

The engine runs in a process of the replica's own (serve/engine_process.py), so that its step loop
and this process's event loop never wait for each other's GIL. The replica keeps the requests'
queues: `generate` (an async generator, called through a streaming deployment handle) sends the
prompt to the engine process and yields the lists of items that come back, in order: {"version": ...}
with the first token, or {"error": ...} (queue full, a prompt the engine refuses, a failed engine);
then {"token": id} items; then {"finish_reason": ...}.
`reconfigure({"artifact": path})` loads another model version: new requests go to it once it is
loaded, requests in flight finish on the version they started on. With `serve.response_cache` on,
a finished deterministic generation (greedy, or seeded) is kept, keyed on version, prompt and
sampling parameters, and the same request is answered again from it without the engine. If the engine process dies, every
request it held gets an internal error at once and the next request starts a new one.
"""

from __future__ import annotations

import asyncio
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
from deepkiln.paths import RunPaths
from deepkiln.paths import version_of

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
        self.ids = itertools.count()
        self.running = 0                             # requests in the engine's batch, as it last said
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loading: dict[str, asyncio.Future] = {}  # reconfigure calls waiting for their version
        self.send_lock = threading.Lock()
        self.cache: OrderedDict[str, list] = OrderedDict()  # response cache: key -> every item, LRU order
        self.cache_hits = 0
        self.gauges = _gauges()
        self.proc = None
        self.restart: asyncio.Future | None = None
        self._start()

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
        self._send(("start", self.cfg.to_dict(), self.artifact))
        if not self.conn.poll(START_TIMEOUT_S):
            self.proc.kill()
            raise EngineFailed(f"the engine process did not load {self.artifact} in {START_TIMEOUT_S} s")
        try:
            message = self.conn.recv()
        except EOFError:
            raise EngineFailed(f"the engine process exited while loading {self.artifact} "
                               f"(code {self.proc.wait()}); its error is in this replica's log") from None
        if message[0] != "loaded":
            raise EngineFailed(f"the engine process could not load {message[1]}: {message[2]}")
        _, self.version, self.layout = message
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

    def _send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """A thread: hand each message of the engine process to the event loop; on its end, fail
        what it held."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("died",)
            try:
                loop.call_soon_threadsafe(self._on_message, conn, message)
            except RuntimeError:  # the loop closed (a test's asyncio.run ended): stop the engine
                self._stop(conn)
                return
            if message[0] == "died":
                return

    def _on_message(self, conn: Connection, message: tuple) -> None:
        kind, *args = message
        if kind == "items":
            self.running, out = args
            for sid, items in out:
                if sid in self.streams:
                    self.streams[sid].put_nowait(items)
        elif kind == "stats":
            self._set_load_gauges(args[0])
        elif kind == "loaded":
            old, (self.version, self.layout) = self.version, args
            self._set_version_gauge(old)
            for future in self.loading.values():  # every reconfigure waiting ends on the newest version
                if not future.done():
                    future.set_result(self.version)
        elif kind == "load_failed":
            future = self.loading.get(args[0])
            if future and not future.done():
                future.set_exception(EngineFailed(f"could not load {args[0]}: {args[1]}"))
        elif kind == "died" and conn is self.conn:
            code = self.proc.wait()
            logger.error(f"the engine process exited with code {code}; the next request starts a new one")
            self.proc, self.reader, self.running = None, None, 0
            error = {"error": "internal", "message": f"the replica's engine process exited (code {code})"}
            for q in self.streams.values():
                q.put_nowait([error])
            for future in self.loading.values():
                if not future.done():
                    future.set_exception(EngineFailed(error["message"]))

    def _stop(self, conn: Connection) -> None:
        try:
            with self.send_lock:
                conn.send(("stop",))
        except OSError:
            pass

    def __del__(self):  # Serve calls it when the replica stops; the engine process ends too
        if getattr(self, "proc", None) is not None:
            self._stop(self.conn)

    # -- requests ----------------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's user_config: {"artifact": path} switches versions."""
        path = (user_config or {}).get("artifact") or RunPaths.of(self.cfg).artifact
        if version_of(path) == self.version:
            return
        await self._ensure_engine()
        self.artifact = path  # what a restarted engine process loads
        future = self.loading[path] = self.loop.create_future()
        self._send(("load", path))
        try:
            await future
        finally:
            self.loading.pop(path, None)

    def info(self) -> dict:
        """What this replica serves: version, processes, load, and the layer types and bytes of its weights."""
        return {"version": self.version, "pid": os.getpid(), "engine_pid": self.proc.pid if self.proc else None,
                "queued": self.queued(), "running": self.running, "cache_entries": len(self.cache),
                "cache_hits": self.cache_hits, **self.layout}

    def queued(self) -> int:
        return max(len(self.streams) - self.running, 0)

    async def generate(self, prompt: list[int], params: dict):
        version = self.version
        key = self._cache_key(version, prompt, params)
        if key in self.cache:
            self.cache.move_to_end(key)
            self.cache_hits += 1
            if self.gauges:
                self.gauges["cache_hits"].inc()
            yield list(self.cache[key])
            return
        await self._ensure_engine()
        if self.queued() >= self.cfg.serve.max_queue:
            yield [{"error": "queue_full", "message": f"the replica's queue is full: {self.queued()} requests "
                    f"wait (serve.max_queue={self.cfg.serve.max_queue})"}]
            return
        sid, queue = next(self.ids), asyncio.Queue()
        self.streams[sid] = queue
        final, seen = False, []
        try:
            self._send(("add", sid, list(prompt), params))
            while not final:
                items = await queue.get()
                while not queue.empty():
                    items += queue.get_nowait()
                final = "finish_reason" in items[-1] or "error" in items[-1]
                seen += items
                yield items
            if key and "finish_reason" in seen[-1] and seen[0].get("version") == version:
                self.cache[key] = seen
                if len(self.cache) > self.cfg.serve.response_cache:
                    self.cache.popitem(last=False)
        finally:  # finished, or the caller went away (disconnect, timeout): free the slot now
            del self.streams[sid]
            if not final and self.proc is not None:
                self._send(("cancel", sid))

    def _cache_key(self, version: str, prompt: list[int], params: dict) -> str | None:
        """The response cache's key for a deterministic request on `version`; None when the cache
        is off or the request samples without a seed."""
        if not self.cfg.serve.response_cache or (params.get("temperature", 1.0) != 0 and params.get("seed") is None):
            return None
        return json.dumps([version, list(prompt), params], sort_keys=True, default=list)

    # -- metrics -----------------------------------------------------------------------------------

    def _set_version_gauge(self, old: str | None) -> None:
        if self.gauges:
            if old:
                self.gauges["version"].set(0, tags={"version": old})
            self.gauges["version"].set(1, tags={"version": self.version})

    def _set_load_gauges(self, tokens_per_s: float) -> None:
        if self.gauges:
            self.gauges["queue"].set(self.queued())
            self.gauges["batch"].set(self.running)
            self.gauges["tokens_per_s"].set(tokens_per_s)


def _gauges() -> dict | None:
    """Prometheus gauges of this replica (through Ray's metrics agent); None outside Ray."""
    import ray
    from ray.util.metrics import Counter, Gauge

    if not ray.is_initialized():
        return None
    return {"queue": Gauge("deepkiln_serve_queue_depth", "requests waiting for a batch slot"),
            "batch": Gauge("deepkiln_serve_batch_size", "requests in the running batch"),
            "tokens_per_s": Gauge("deepkiln_serve_tokens_per_s", "tokens generated per second, over the last second"),
            "cache_hits": Counter("deepkiln_serve_response_cache_hits", "requests answered from the response cache"),
            "version": Gauge("deepkiln_serve_model_version", "1 for the model version being served",
                             tag_keys=("version",))}


LLMServerDeployment = serve.deployment(LLMServer, name="LLMServer")
