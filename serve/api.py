"""The OpenAI-compatible HTTP ingress: /v1/models, /v1/completions, /v1/chat/completions,
/v1/feedback, /health.

Text goes in and out here (the tokenizer and chat template live in the ingress); token ids go to the
LLMServer replicas through a streaming deployment handle, one call per request (all its choices).
Every error a client can cause is a 4xx in OpenAI's shape {"error": {"message", "type", "param",
"code"}} naming the field: bodies are parsed here rather than by FastAPI, so invalid JSON or UTF-8,
nesting too deep, integers too long, lone surrogates, wrong types, out-of-range values and fields
deepkiln does not implement (serve/schemas.py's table) all name their field. A 5xx says only
"internal error" and a request id that the replica's log holds with the traceback. One pure ASGI
middleware checks the API key on every route but /health, stamps the request id, refuses a body
whose declared size is over its route's limit before anything reads it, and counts every response by
route and code. Cheap refusals come first: a prompt longer in characters than the context could hold
is refused before tokenizing, and tokenizing runs off the event loop. A completion never waits on
the feedback store for longer than FEEDBACK_WAIT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from actors.feedback import FeedbackError, collectors, shard_of
from deepkiln.config import Config
from deepkiln.paths import RunPaths, tokenizer_of
from deepkiln.tokenizer import load_tokenizer
from serve.llm import context_length
from serve.protocol import QUEUE_FULL, Failed, Finished, Started, Tokens
from serve.schemas import UNSUPPORTED, ChatRequest, CompletionRequest

app = FastAPI(title="deepkiln", docs_url=None, redoc_url=None, openapi_url=None)
logger = logging.getLogger("ray.serve")
RETRIES = 2              # re-sends of a generate call whose replica failed before its first message
FEEDBACK_WAIT_S = 2.0    # longest a completion waits for its collector to keep it
ROUTES = {"/health": "health", "/v1/models": "models", "/v1/completions": "completions",
          "/v1/chat/completions": "chat", "/v1/feedback": "feedback"}
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error(request_id: str) -> APIError:
    """What a client sees of a failure of ours: no exception text, a request id for the log."""
    return APIError(500, f"internal error (request id {request_id})", type="server_error", code="internal")


class EveryRequest:
    """Pure ASGI middleware (no BaseHTTPMiddleware task per request): the API key on every route
    but /health, a request id, a body whose declared size is over its route's limit refused 413
    before any routing or reading, and the count of every response by route and code, 5xx included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress: OpenAIIngress = serve.get_replica_context().servable_object  # Serve serves a copy of `app`
        request = Request(scope)
        request_id = uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        status = None

        async def stamped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),  # Serve sets x-request-id
                                      (b"x-deepkiln-request-id", request_id.encode())]
            await send(message)

        try:
            if scope["path"] != "/health":
                ingress.authorize(request)
                ingress.check_declared_size(scope["path"], request.headers.get("content-length"))
            await self.app(scope, receive, stamped)
        except Exception as e:
            if status is not None:  # the response had started: nothing more can be said to the client
                logger.exception(f"request {request_id} failed mid-response")
                raise
            if not isinstance(e, APIError):
                logger.exception(f"request {request_id} failed")
            await (e if isinstance(e, APIError) else internal_error(request_id)).response()(scope, receive, stamped)
        finally:
            ingress.metrics.requests.inc(tags={"route": ROUTES.get(scope["path"], "other"),
                                               "code": str(status if status is not None else 500)})


app.add_middleware(EveryRequest)


def generation_body_limit(s, context: int, most_chars: int, vocab: int) -> int:
    """The most bytes a completion or chat request this server could accept can take, so that a
    larger one is refused unparsed: the prompt text the context can hold (`most_chars`) at 12 bytes
    a character (JSON-escaped, the worst case) or max_n x 4 prompts of token ids, a logit_bias entry
    for every token, message framing, and 64 KiB for the other fields; at most serve.max_body_bytes."""
    prompt = max(12 * most_chars, 8 * context * 4 * s.max_n)
    return min(s.max_body_bytes, prompt + 24 * vocab + 64 * context + 65536)


def configured_api_keys(cfg: Config) -> list[str]:
    """The API keys, failing closed: serve.api_key_file when set, one key per line (missing,
    unreadable or without a key: a ValueError), else the variable serve.api_key_env ([] when unset:
    no key)."""
    s = cfg.serve
    if s.api_key_file:
        try:
            lines = Path(s.api_key_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"serve.api_key_file={s.api_key_file!r} cannot be read ({type(e).__name__}): "
                             "refusing to serve without the key it was told to use") from None
        keys = [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
        if not keys:
            raise ValueError(f"serve.api_key_file={s.api_key_file!r} is empty: refusing to serve without a key")
        return keys
    key = os.environ.get(s.api_key_env, "").strip()
    return [key] if key else []


def key_digests(keys: list[str]) -> list[str]:
    """What an ingress replica is given of the keys: their SHA-256, never the keys."""
    return [hashlib.sha256(k.encode()).hexdigest() for k in keys]


def source_of(digest: str) -> str:
    """The feedback source a key stands for: a prefix of its SHA-256 ('anonymous' without keys)."""
    return f"key-{digest[:12]}" if digest else "anonymous"


def check_exposure(cfg: Config, key) -> None:
    """A server on anything but a loopback address needs a key, unless serve.allow_unauthenticated."""
    host = cfg.serve.host
    if not key and host not in ("127.0.0.1", "localhost", "::1") and not cfg.serve.allow_unauthenticated:
        raise ValueError(f"serve.host={host!r} exposes the API beyond this machine without a key: set "
                         f"serve.api_key_file or {cfg.serve.api_key_env}, or serve.allow_unauthenticated=true")


def _metrics() -> SimpleNamespace:
    from ray.util.metrics import Counter, Histogram

    return SimpleNamespace(
        requests=Counter("deepkiln_serve_requests", "HTTP responses by route and status code",
                         tag_keys=("route", "code")),
        ttft=Histogram("deepkiln_serve_time_to_first_token_s", "seconds to the first token",
                       boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]),
        latency=Histogram("deepkiln_serve_latency_s", "seconds per request",
                          boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]),
        tokens=Counter("deepkiln_serve_completion_tokens", "completion tokens sent"),
        feedback_lost=Counter("deepkiln_serve_feedback_not_kept",
                              "completions whose collector did not keep them in time (their feedback is lost)"))


def _replica_error(item: Failed) -> APIError:
    """The APIError for a Failed item from LLMServer.generate."""
    if item.kind == QUEUE_FULL:
        return APIError(503, item.message, type="server_error", code="queue_full", headers={"Retry-After": "1"})
    if item.kind == "invalid_request":
        return APIError(400, item.message, code="invalid_value")
    raise RuntimeError(f"generation failed: {item.message}")  # a 500 with a request id


@dataclass
class _Choice:
    """One choice as it streams in: its tokens, their log-probabilities, and what was sent."""
    index: int
    prompt: int                                       # which prompt it continues
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: tuple | None = None
    sent_text: str = ""
    sent_tokens: int = 0
    finish: str | None = None
    finish_sent: bool = False                          # its last chunk went out (streaming)


class OpenAIIngress:
    def __init__(self, llm, config: dict, api_key_sha256: list[str]):
        """`api_key_sha256`: the keys' SHA-256 (serve.app.build reads the keys where the app is
        deployed); empty for none."""
        self.cfg = Config.from_dict(config)
        self.llm = llm
        self.tokenizer = load_tokenizer(tokenizer_of(self.cfg, RunPaths.of(self.cfg).artifact))  # the served artifact's
        self.api_key_sha256 = list(api_key_sha256)
        check_exposure(self.cfg, self.api_key_sha256)
        self.context = context_length(self.cfg)
        self.most_chars = self.context * self.tokenizer.longest_piece_chars  # a longer prompt cannot fit
        self.body_limit = generation_body_limit(self.cfg.serve, self.context, self.most_chars,
                                                self.tokenizer.vocab_size)
        self.metrics = _metrics()
        self.collectors = collectors(self.cfg, configure=True)

    # -- routes -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    def pid(self) -> int:  # for tests and operators, through a deployment handle (not over HTTP)
        return os.getpid()

    def settings(self) -> dict:
        """What this app was deployed with (through a deployment handle, never over HTTP): its config
        and the keys' SHA-256. pipelines.online republishes with these, so a new model version
        changes the artifact and nothing else (key, limits, serve.* settings)."""
        return {"config": self.cfg.to_dict(), "api_key_sha256": self.api_key_sha256}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.serve.model_name, "object": "model", "created": 0,
                                            "owned_by": "deepkiln"}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, CompletionRequest, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, ChatRequest, "chat")

    @app.post("/v1/feedback")
    async def feedback(self, request: Request):
        """A rating (and optionally a corrected answer and tags) of a completion this server gave,
        committed by its FeedbackCollector before the answer; the same feedback_id twice is stored once
        (another payload under a stored feedback_id is a 409)."""
        body = await self._read_json(request)  # the collector validates it, naming the field
        n = len(self.collectors)
        owner, keeper = (shard_of(str(body.get(k)), n) for k in ("feedback_id", "completion_id"))
        try:
            # Stored by the collector its feedback_id hashes to (one id, one record, across collectors),
            # with the completion from the collector that keeps it.
            result = await asyncio.wait_for(self._submit(body, owner, keeper, request.state.source),
                                            self.cfg.serve.request_timeout_s)
        except TimeoutError:
            raise APIError(503, "the feedback store did not answer in time; retry with the same feedback_id",
                           type="server_error", code="unavailable", headers={"Retry-After": "1"}) from None
        except RayTaskError as e:
            if not isinstance(e.cause, FeedbackError):
                raise
            raise APIError(e.cause.status, e.cause.message, param=e.cause.param,
                           code={404: "not_found", 409: "conflict"}.get(e.cause.status, "invalid_value")) from None
        return JSONResponse({"object": "feedback", **result})

    async def _submit(self, body: dict, owner: int, keeper: int, source: str) -> dict:
        served = None
        if owner != keeper and isinstance(body.get("completion_id"), str):
            served = await self.collectors[keeper].served.remote(body["completion_id"])
        return await self.collectors[owner].submit.remote(body, served, source)

    # -- request handling --------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """401 unless the request carries one of the keys (compared with every digest, in constant
        time each); request.state.source names the key it carried, for feedback attribution."""
        request.state.source = source_of("")
        if not self.api_key_sha256:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).hexdigest()
        matched = [hmac.compare_digest(digest, d) for d in self.api_key_sha256]
        if scheme.lower() != "bearer" or not any(matched):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        request.state.source = source_of(digest)

    async def _serve(self, request: Request, schema, route: str):
        start = time.perf_counter()
        deadline = time.monotonic() + self.cfg.serve.request_timeout_s
        body = await self._parse(request, schema)
        prompts, texts, params = await self._prepare(body, route)
        events = self._events(body, prompts, params, deadline)
        if body.stream:
            # The first items are awaited before the 200 goes out, so that a full queue or a timeout
            # still gets its own status code.
            first = await anext(events)
            return StreamingResponse(self._stream(body, prompts, texts, first, events, route, start,
                                                  request.state.request_id), media_type="text/event-stream")
        return JSONResponse(await self._complete(body, prompts, texts, events, route, start))

    async def _parse(self, request: Request, schema):
        data = await self._read_json(request)
        try:
            return schema.model_validate(data)
        except pydantic.ValidationError as e:
            raise _validation_error(e) from None

    def body_limit_of(self, path: str) -> int:
        """The most bytes a body may have on `path`: a generation route's need, else serve.max_body_bytes."""
        return self.body_limit if path in ("/v1/completions", "/v1/chat/completions") else self.cfg.serve.max_body_bytes

    def _why(self, limit: int) -> str:
        return ("serve.max_body_bytes" if limit == self.cfg.serve.max_body_bytes else
                f"the most a request can need for a context of {self.context} tokens")

    def check_declared_size(self, path: str, declared: str | None) -> None:
        """413 for a Content-Length over the route's limit, before anything reads the body."""
        limit = self.body_limit_of(path)
        # ASCII digits only ("²".isdigit() holds, int() refuses it), and no int() of a huge string
        if declared and declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise APIError(413, f"request body has {declared} bytes; the limit is {limit} ({self._why(limit)})",
                           code="body_too_large")

    async def _read_json(self, request: Request) -> dict:
        """The body as a JSON object: within its route's limit (body_limit_of; 413: a declared larger
        size was refused by EveryRequest, unread), valid UTF-8 and JSON, not nested too deep, no
        integer too long, no lone surrogate in any string (400)."""
        limit = self.body_limit_of(request.url.path)
        why = self._why(limit)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body exceeds {limit} bytes ({why})", code="body_too_large")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8: {e.reason} at byte {e.start}",
                           code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply to parse", code="invalid_json") from None
        except ValueError as e:  # JSONDecodeError, and integers beyond Python's digit limit
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        where = _lone_surrogate(data)
        if where is not None:
            raise APIError(400, f"{where or 'a key'}: holds a lone UTF-16 surrogate, which is not text",
                           param=where or None, code="invalid_value")
        return data

    async def _prepare(self, body, route: str) -> tuple[list[list[int]], list[str], object]:
        """(prompt token ids, prompt texts, SamplingParams), after every limit: the cheap ones
        (characters against the context) before tokenizing, which runs off the event loop."""
        s = self.cfg.serve
        if body.model != s.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server has {s.model_name!r}",
                           param="model", code="model_not_found")
        if body.n > s.max_n:
            raise APIError(400, f"n={body.n} exceeds the limit {s.max_n} (serve.max_n)", param="n", code="invalid_value")
        param = "messages" if route == "chat" else "prompt"
        if route == "chat":
            texts, stops = [m.text() for m in body.messages], self.tokenizer.chat_stops
        else:
            texts, stops = ([body.prompt] if isinstance(body.prompt, str) else
                            body.prompt if isinstance(body.prompt[0], str) else []), (self.tokenizer.eos_id,)
        chars, most = sum(map(len, texts)), self.most_chars
        if chars > most:
            raise APIError(400, f"the prompt has {chars} characters: more than the context of {self.context} tokens "
                                f"can hold", param=param, code="context_length_exceeded")
        if route == "chat":
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:  # an imported tokenizer's own template may refuse a conversation (e.g. roles out of turn)
                prompts = [await asyncio.to_thread(self.tokenizer.apply_chat_template, messages)]
            except ValueError as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
        elif texts:
            bos = self.tokenizer.encode_prompt("")
            prompts = [[*bos, *ids] for ids in await asyncio.to_thread(self.tokenizer.encode_batch, texts)]
        else:
            prompts = [list(body.prompt)] if isinstance(body.prompt[0], int) else [list(p) for p in body.prompt]
            vocab = self.tokenizer.vocab_size
            if any(not p or not all(0 <= t < vocab for t in p) for p in prompts):
                raise APIError(400, f"prompt: token ids must be in 0..{vocab - 1}, in non-empty lists", param="prompt",
                               code="invalid_value")
            texts = [self.tokenizer.decode(p) for p in prompts]
        if len(prompts) * body.n > s.max_n * 4:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} choices exceed {s.max_n * 4} (serve.max_n x 4)",
                           param="prompt", code="invalid_value")
        longest = max(map(len, prompts))
        if longest >= self.context:
            raise APIError(400, f"the prompt has {longest} tokens; the context length is {self.context}",
                           param=param, code="context_length_exceeded")
        budget, name = body.completion_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if budget is not None and budget > s.max_tokens:
            raise APIError(400, f"{name}={budget} exceeds the limit {s.max_tokens} (serve.max_tokens)",
                           param=name, code="invalid_value")
        if budget is not None and longest + budget > self.context:
            raise APIError(400, f"the prompt has {longest} tokens and {name} is {budget}: together "
                                f"{longest + budget}, over the context length {self.context}",
                           param=name, code="context_length_exceeded")
        vocab = self.tokenizer.vocab_size
        if body.logit_bias and max(body.logit_bias) >= vocab:
            raise APIError(400, f"logit_bias: token {max(body.logit_bias)} is beyond the vocabulary (0..{vocab - 1})",
                           param="logit_bias", code="invalid_value")
        params = body.to_sampling_params(budget or min(s.max_tokens, self.context - longest), stops)
        return prompts, texts, params

    async def _events(self, body, prompts, params, deadline: float):
        """The request's stream items, each list as it arrives; past `deadline`: 408."""
        messages = self._generate(prompts, params, body.n)
        try:
            while True:
                try:
                    items = await asyncio.wait_for(anext(messages), deadline - time.monotonic())
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise APIError(408, "the request took longer than serve.request_timeout_s="
                                   f"{self.cfg.serve.request_timeout_s}", type="timeout_error", code="timeout") from None
                for item in items:
                    if isinstance(item, Failed):
                        raise _replica_error(item)
                yield items
        finally:
            await messages.aclose()  # cancels the call (the replica frees the slots)

    async def _generate(self, prompts, params, n: int):
        """The messages of LLMServer.generate. A replica that dies or leaves before its first
        message (a redeploy, a crash) has done nothing for this request yet: the call goes to
        another replica, up to RETRIES times. After the first message a failure is final. A full
        queue in front of the replicas is a 503. Closing this generator cancels the call."""
        for attempt in range(RETRIES + 1):
            gen, started, finished = None, False, False
            try:  # a full queue may raise from remote() itself, or from the first message
                gen = self.llm.options(stream=True).generate.remote(prompts, params, n)
                async for items in gen:
                    started = True
                    yield items
                finished = True
                return
            except BackPressureError:
                raise APIError(503, "every replica's queue is full (serve.max_queue): retry later", type="server_error",
                               code="queue_full", headers={"Retry-After": "1"}) from None
            except RayActorError as e:
                if started or attempt == RETRIES:
                    raise
                logger.warning(f"LLMServer replica failed before answering ({type(e).__name__}); retrying on another")
            finally:
                if gen is not None and not finished:  # a finished call needs no cancel (an RPC per request)
                    with contextlib.suppress(Exception):  # cancel re-raises a call that failed (a full queue)
                        gen.cancel()

    def _apply(self, choices: list[_Choice], body, items) -> list[_Choice]:
        """Feed stream items to their choices; return the choices that changed, each once."""
        changed: dict[int, _Choice] = {}
        for item in items:
            if isinstance(item, Tokens):
                c = choices[item.index]
                c.tokens += item.ids
                if item.logprobs is not None:
                    c.logprobs += item.logprobs
                if item.prompt_logprobs is not None:
                    c.prompt_logprobs = item.prompt_logprobs
                changed[c.index] = c
            elif isinstance(item, Finished):
                c = choices[item.index]
                c.finish = c.finish or ("stop" if item.reason == "stop" else "length")
                changed[c.index] = c
        return list(changed.values())

    def _delta(self, c: _Choice, body) -> tuple[str, list]:
        """The text and token log-probabilities of `c` not sent yet: stop strings cut it (and end
        the choice), a partial UTF-8 character and what could still grow into a stop string wait."""
        text = self.tokenizer.decode(c.tokens)
        cut = min((text.find(s) for s in body.stop if s in text), default=-1)
        if cut >= 0:
            c.finish, ready = "stop", text[:cut]
        elif c.finish:
            ready = text
        else:
            hold = max((len(s) - 1 for s in body.stop), default=0)
            ready = (text[:len(text) - hold] if hold else text).rstrip("\ufffd")
        if len(ready) < len(c.sent_text):
            ready = c.sent_text
        delta, c.sent_text = ready[len(c.sent_text):], ready
        entries = []
        if c.logprobs:  # the tokens the sent text now covers (all of them at the end)
            covered = len(c.tokens) if c.finish and cut < 0 else self._tokens_within(c.tokens, len(ready))
            entries = self._logprob_entries(c.tokens[c.sent_tokens:covered], c.logprobs[c.sent_tokens:covered])
            c.sent_tokens = covered
        return delta, entries

    def _tokens_within(self, tokens: list[int], chars: int) -> int:
        k = 0
        while k < len(tokens) and len(self.tokenizer.decode(tokens[:k + 1])) <= chars:
            k += 1
        return k

    def _logprob_entries(self, tokens, logprobs) -> list[dict]:
        return [{"token": self._token_text(t), "logprob": lp, "bytes": list(self.tokenizer.token_bytes(t)),
                 "top_logprobs": [{"token": self._token_text(a), "logprob": alp,
                                   "bytes": list(self.tokenizer.token_bytes(a))} for a, alp in top]}
                for t, (lp, top) in zip(tokens, logprobs)]

    def _token_text(self, token: int) -> str:
        raw = self.tokenizer.token_bytes(token)
        try:
            return raw.decode()
        except UnicodeDecodeError:  # one byte of a character: OpenAI writes it as bytes:\xNN
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    async def _complete(self, body, prompts, texts, events, route, start) -> dict:
        chat = route == "chat"
        choices = [_Choice(i, i // body.n) for i in range(len(prompts) * body.n)]
        version, first_token = "", None
        out = {c.index: ("", []) for c in choices}
        async for items in events:
            for item in items:
                if isinstance(item, Started):
                    version = item.version
            for c in self._apply(choices, body, items):
                first_token = first_token or time.perf_counter()
                delta, entries = self._delta(c, body)
                text, logprobs = out[c.index]
                out[c.index] = (text + delta, logprobs + entries)
        self._record(choices, start, first_token)
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        await self._remember(completion_id, body, texts, out[0][0], version)
        usage = self._usage(prompts, choices)
        made = []
        for c in choices:
            text, logprobs = out[c.index]
            if chat:
                made.append({"index": c.index, "message": {"role": "assistant", "content": text},
                             "logprobs": {"content": logprobs} if body.logprobs else None, "finish_reason": c.finish})
            else:
                echo = texts[c.prompt] if body.echo else ""
                made.append({"index": c.index, "text": echo + text, "finish_reason": c.finish,
                             "logprobs": self._completion_logprobs(body, c, prompts, echo, logprobs)})
        return {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.model, "system_fingerprint": version,
                "choices": made, "usage": usage}

    def _completion_logprobs(self, body, c: _Choice, prompts, echo: str, entries: list[dict]) -> dict | None:
        """The completions API's logprobs object: tokens, token_logprobs, top_logprobs, text_offset;
        with echo, the prompt's tokens first (the first one has no log-probability)."""
        if body.logprobs is None:
            return None
        if echo:
            bos = self.tokenizer.encode_prompt("")
            prompt = prompts[c.prompt][len(bos):] if bos and prompts[c.prompt][:len(bos)] == bos else prompts[c.prompt]
            head = list(c.prompt_logprobs or [])[-len(prompt):] if prompt else []
            entries = [{"token": self._token_text(t), "logprob": None if e is None else e[0],
                        "top_logprobs": [] if e is None else
                        [{"token": self._token_text(a), "logprob": lp} for a, lp in e[1]]}
                       for t, e in zip(prompt, head)] + entries
        offsets, at = [], 0
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["logprob"] is None else {a["token"]: a["logprob"] for a in e["top_logprobs"]}
                                 for e in entries], "text_offset": offsets}

    async def _stream(self, body, prompts, texts, first, events, route, start, request_id):
        """Server-sent events: a chunk per text delta, a usage chunk when asked, then `data: [DONE]`.
        An error after the 200 went out (a timeout) is an error event, and the stream ends without [DONE]."""
        chat = route == "chat"
        choices = [_Choice(i, i // body.n) for i in range(len(prompts) * body.n)]
        version = next((i.version for i in first if isinstance(i, Started)), "")
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.model, "system_fingerprint": version}
        answers, first_token = {c.index: "" for c in choices}, None

        def chunk(items, **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': items, **extra})}\n\n"

        async def all_items():
            yield first
            async for items in events:
                yield items

        if chat:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for c in choices])
        elif body.echo:
            yield chunk([{"index": c.index, "text": texts[c.prompt], "logprobs": None, "finish_reason": None}
                         for c in choices])
        try:
            async for items in all_items():
                for c in self._apply(choices, body, items):
                    if c.finish_sent:  # a stop string ended it; what the engine sent after is dropped
                        continue
                    first_token = first_token or time.perf_counter()
                    delta, entries = self._delta(c, body)
                    answers[c.index] += delta
                    if not delta and not c.finish:
                        continue
                    c.finish_sent = c.finish is not None
                    if chat:
                        yield chunk([{"index": c.index, "delta": {"content": delta} if delta else {},
                                      "logprobs": {"content": entries} if body.logprobs else None,
                                      "finish_reason": c.finish}])
                    else:
                        yield chunk([{"index": c.index, "text": delta, "finish_reason": c.finish,
                                      "logprobs": self._completion_logprobs(body, c, prompts, "", entries)}])
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        except Exception:
            logger.exception(f"request {request_id} failed while streaming")
            yield f"data: {json.dumps(internal_error(request_id).body())}\n\n"
            return
        self._record(choices, start, first_token)
        await self._remember(head["id"], body, texts, answers[0], version)
        if body.include_usage:
            yield chunk([], usage=self._usage(prompts, choices))
        yield "data: [DONE]\n\n"

    def _usage(self, prompts, choices: list[_Choice]) -> dict:
        prompt = sum(map(len, prompts))
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _remember(self, completion_id: str, body, texts: list[str], text: str, version: str) -> None:
        """Keep the completion (its first choice) for feedback to refer to, before the client has its
        id, waiting FEEDBACK_WAIT_S at most: a collector that is slow or down costs the feedback on
        this completion (counted), never the completion."""
        prompt = texts[0] if isinstance(body, CompletionRequest) else \
            json.dumps([{"role": m.role, "content": m.text()} for m in body.messages])
        collector = self.collectors[shard_of(completion_id, len(self.collectors))]
        try:
            await asyncio.wait_for(collector.remember.remote(completion_id, prompt, text, version, body.user),
                                   FEEDBACK_WAIT_S)
        except Exception as e:
            self.metrics.feedback_lost.inc()
            logger.warning(f"could not keep completion {completion_id} for feedback ({type(e).__name__})")

    def _record(self, choices: list[_Choice], start: float, first_token: float | None) -> None:
        if first_token is not None:
            self.metrics.ttft.observe(first_token - start)
        tokens = sum(len(c.tokens) for c in choices)
        if tokens:
            self.metrics.tokens.inc(tokens)
        self.metrics.latency.observe(time.perf_counter() - start)


def _lone_surrogate(data) -> str | None:
    """The dotted path of the first string (or key) holding a lone surrogate, '' for a key at the
    top; None when there is none. Iterative: the parser already bounded the depth."""
    stack = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return path
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack += [(item, f"{path}.{i}") for i, item in enumerate(value)]
    return None


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _validation_error(e: pydantic.ValidationError) -> APIError:
    """A 400 naming the first field pydantic refused: an unknown field as OpenAI words it, a field
    deepkiln does not implement as such, else pydantic's own words. The path keeps field names and
    list indices (not pydantic's union tags); a check across fields names the field it starts with."""
    err = max(e.errors(), key=lambda err: len(err["loc"]))  # of a union's branches, the one that got furthest
    loc = [str(p) for p in err["loc"] if isinstance(p, int) or (_FIELD.fullmatch(p) and p not in _TYPE_TAGS)]
    message = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else err["msg"]
    if not loc and _FIELD.match(message):  # e.g. "best_of > n is not supported ..."
        loc = [_FIELD.match(message).group()]
    field_name = ".".join(loc)
    if err["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {field_name}"
    elif loc and loc[0] in UNSUPPORTED:
        message = f"{loc[0]}: not supported by this server ({message})"
    elif field_name and not message.startswith(field_name):
        message = f"{field_name}: {message}"
    return APIError(400, message, param=field_name or None, code="invalid_value")


OpenAIIngressDeployment = serve.deployment(serve.ingress(app)(OpenAIIngress), name="OpenAIIngress")
