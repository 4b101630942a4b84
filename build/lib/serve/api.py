"""The OpenAI-compatible HTTP ingress: /v1/models, /v1/completions, /v1/chat/completions,
/v1/feedback, /health.

Text goes in and out here (the tokenizer and chat template live in the ingress); token ids go to the
LLMServer replicas through a streaming deployment handle. Every error a client can cause is a 4xx
in OpenAI's shape {"error": {"message", "type", "param", "code"}}: bodies are parsed here rather
than by FastAPI, so invalid JSON or UTF-8, wrong types and out-of-range values all name their field.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from actors.feedback import FeedbackError, collectors, shard_of
from deepkiln.config import Config
from deepkiln.paths import RunPaths
from deepkiln.tokenizer import EOS_ID, SPECIAL_TOKENS, Tokenizer
from serve.llm import context_length
from serve.schemas import (ChatChoice, ChatCompletion, ChatMessage, ChatRequest, Completion, CompletionChoice,
                           CompletionRequest, Usage)

app = FastAPI(title="deepkiln", docs_url=None, redoc_url=None)
logger = logging.getLogger("ray.serve")
RETRIES = 2  # re-sends of a generate call whose replica failed before its first message
END_ID = SPECIAL_TOKENS["<|end|>"]


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


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response()


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {e!r}", type="server_error").response()


def read_api_key(cfg: Config) -> str:
    """The key from serve.api_key_file, else from the variable serve.api_key_env; '' for none."""
    s = cfg.serve
    if s.api_key_file:
        return Path(s.api_key_file).read_text().strip()
    return os.environ.get(s.api_key_env, "").strip()


class _Metrics:
    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("deepkiln_serve_requests", "HTTP requests by route and status code",
                                tag_keys=("route", "code"))
        self.ttft = Histogram("deepkiln_serve_time_to_first_token_s", "seconds to the first token",
                              boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        self.latency = Histogram("deepkiln_serve_latency_s", "seconds per request",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60])
        self.tokens = Counter("deepkiln_serve_completion_tokens", "completion tokens sent")


def _replica_error(item: dict) -> APIError:
    """The APIError for an {"error": ...} item from LLMServer.generate."""
    if item["error"] == "queue_full":
        return APIError(503, item["message"], type="server_error", code="queue_full", headers={"Retry-After": "1"})
    if item["error"] == "internal":
        return APIError(500, item["message"], type="server_error", code="internal")
    return APIError(400, item["message"], code="invalid_value")


class OpenAIIngress:
    def __init__(self, llm, config: dict):
        self.cfg = Config.from_dict(config)
        self.llm = llm
        self.tokenizer = Tokenizer.load(RunPaths.of(self.cfg).tokenizer_model)
        self.api_key = read_api_key(self.cfg)
        self.context = context_length(self.cfg)
        self.metrics = _Metrics()
        self.collectors = collectors(self.cfg)

    # -- routes -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    def pid(self) -> int:  # for tests and operators, through a deployment handle (not over HTTP)
        return os.getpid()

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
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
        committed by its FeedbackCollector before the answer; the same feedback_id twice is stored once."""
        try:
            self._authorize(request)
            body = await self._read_json(request)  # the collector validates it, naming the field
            collector = self.collectors[shard_of(str(body.get("completion_id")), len(self.collectors))]
            try:
                result = await collector.submit.remote(body)
            except RayTaskError as e:
                if not isinstance(e.cause, FeedbackError):
                    raise
                raise APIError(e.cause.status, e.cause.message, param=e.cause.param,
                               code="not_found" if e.cause.status == 404 else "invalid_value") from None
            response = JSONResponse({"object": "feedback", **result})
        except APIError as e:
            response = e.response()
        self.metrics.requests.inc(tags={"route": "feedback", "code": str(response.status_code)})
        return response

    # -- request handling --------------------------------------------------------------------------

    async def _serve(self, request: Request, schema, route: str):
        start = time.perf_counter()
        try:
            self._authorize(request)
            body = await self._parse(request, schema)
            prompt, params = self._prepare(body, route)
            events = self._choices(body, prompt, params, time.monotonic() + self.cfg.serve.request_timeout_s)
            if body.stream:
                # The first token is awaited before the 200 goes out, so that a full queue or a
                # timeout still gets its own status code.
                first = await anext(events)
                response = StreamingResponse(self._stream(body, prompt, first, events, route, start),
                                             media_type="text/event-stream")
            else:
                response = JSONResponse((await self._complete(body, prompt, events, route, start)).model_dump())
        except APIError as e:
            response = e.response()
        self.metrics.requests.inc(tags={"route": route, "code": str(response.status_code)})
        return response

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _parse(self, request: Request, schema):
        data = await self._read_json(request)
        try:
            return schema.model_validate(data)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise APIError(400, f"{field}: {err['msg']}", param=field, code="invalid_value") from None

    async def _read_json(self, request: Request) -> dict:
        """The body as a JSON object, within serve.max_body_bytes (413), valid UTF-8 and JSON (400)."""
        limit = self.cfg.serve.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body has {declared} bytes; the limit is {limit} (serve.max_body_bytes)",
                           code="body_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body exceeds {limit} bytes (serve.max_body_bytes)", code="body_too_large")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8: {e}", code="invalid_json") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return data

    def _prepare(self, body, route: str) -> tuple[list[int], dict]:
        s = self.cfg.serve
        if body.model != s.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server has {s.model_name!r}",
                           param="model", code="model_not_found")
        if body.n > s.max_n:
            raise APIError(400, f"n={body.n} exceeds the limit {s.max_n} (serve.max_n)", param="n", code="invalid_value")
        if route == "chat":
            prompt = self.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
            stops = (EOS_ID, END_ID)
        else:
            prompt = self.tokenizer.encode_prompt(body.prompt)
            stops = (EOS_ID,)
        if len(prompt) >= self.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context length is {self.context}",
                           param="messages" if route == "chat" else "prompt", code="context_length_exceeded")
        if body.max_tokens is not None and body.max_tokens > s.max_tokens:
            raise APIError(400, f"max_tokens={body.max_tokens} exceeds the limit {s.max_tokens} (serve.max_tokens)",
                           param="max_tokens", code="invalid_value")
        if body.max_tokens is not None and len(prompt) + body.max_tokens > self.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {body.max_tokens}: together "
                           f"{len(prompt) + body.max_tokens}, over the context length {self.context}",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = body.max_tokens or min(s.max_tokens, self.context - len(prompt))
        params = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "stop_token_ids": stops, "seed": body.seed}
        return prompt, params

    async def _choices(self, body, prompt: list[int], params: dict, deadline: float):
        """Run the request's n generations together; yield (index, text delta, finish_reason, info)
        as tokens arrive, until each choice has finished. Past `deadline` (time.monotonic()): 408."""
        events: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._one(i, body, prompt, params, events)) for i in range(body.n)]
        try:
            for _ in range(body.n):
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), deadline - time.monotonic())
                    except TimeoutError:
                        raise APIError(408, "the request took longer than serve.request_timeout_s="
                                       f"{self.cfg.serve.request_timeout_s}", type="timeout_error", code="timeout") from None
                    if isinstance(event, APIError):
                        raise event
                    yield event
                    if event[2] is not None:
                        break
        finally:
            for t in tasks:
                t.cancel()

    async def _one(self, index: int, body, prompt: list[int], params: dict, events: asyncio.Queue) -> None:
        params = {**params, "seed": None if params["seed"] is None else params["seed"] + index}
        tokens, sent, info = [], "", {"completion_tokens": 0}
        try:
            async with contextlib.aclosing(self._generate(prompt, params)) as messages:
                async for items in messages:  # each message: every item the replica had ready
                    finish = None
                    for item in items:
                        if "error" in item:
                            await events.put(_replica_error(item))
                            return
                        if "version" in item:
                            info["version"] = item["version"]
                        elif "token" in item:
                            tokens.append(item["token"])
                        else:
                            finish = "stop" if item["finish_reason"] == "stop" else "length"
                    if not tokens and finish is None:
                        continue
                    info.setdefault("first_token", time.perf_counter())
                    info["completion_tokens"] = len(tokens)
                    text = self.tokenizer.decode(tokens)
                    cut = min((text.find(s) for s in body.stop if s in text), default=-1)
                    if cut >= 0 or finish:
                        await events.put((index, text[len(sent):cut] if cut >= 0 else text[len(sent):],
                                          "stop" if cut >= 0 else finish, info))
                        return
                    # Hold back a partial UTF-8 character and what could still become a stop string.
                    hold = max((len(s) - 1 for s in body.stop), default=0)
                    ready = (text[:len(text) - hold] if hold else text).rstrip("\ufffd")
                    if len(ready) > len(sent):
                        await events.put((index, ready[len(sent):], None, info))
                        sent = ready
        except Exception as e:  # never leave the request waiting on a choice that died
            logger.exception("generation failed")
            await events.put(APIError(500, f"generation failed: {e!r}", type="server_error"))

    async def _generate(self, prompt: list[int], params: dict):
        """The messages of LLMServer.generate. A replica that dies or leaves before its first
        message (a redeploy, a crash) has done nothing for this request yet: the call goes to
        another replica, up to RETRIES times. After the first message a failure is final. Closing
        this generator cancels the call (the replica frees the request's slot)."""
        for attempt in range(RETRIES + 1):
            gen = self.llm.options(stream=True).generate.remote(prompt, params)
            started = finished = False
            try:
                async for items in gen:
                    started = True
                    yield items
                finished = True
                return
            except RayActorError as e:
                if started or attempt == RETRIES:
                    raise
                logger.warning(f"LLMServer replica failed before answering ({e!r}); retrying on another")
            finally:
                if not finished:  # a finished call needs no cancel (it would cost an RPC per request)
                    gen.cancel()

    async def _complete(self, body, prompt, events, route, start):
        texts, finishes, infos = [""] * body.n, [None] * body.n, [None] * body.n
        async for index, delta, finish, info in events:
            texts[index] += delta
            finishes[index], infos[index] = finish, info
        self._record(infos, start)
        completion = sum(i["completion_tokens"] for i in infos)
        usage = Usage(prompt_tokens=len(prompt), completion_tokens=completion, total_tokens=len(prompt) + completion)
        common = {"created": int(time.time()), "model": body.model, "system_fingerprint": infos[0].get("version", ""),
                  "usage": usage}
        completion_id = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        await self._remember(completion_id, body, texts[0], common["system_fingerprint"])
        if route == "chat":
            return ChatCompletion(id=completion_id, **common, choices=[
                ChatChoice(index=i, message=ChatMessage(role="assistant", content=t), finish_reason=f)
                for i, (t, f) in enumerate(zip(texts, finishes))])
        return Completion(id=completion_id, **common, choices=[
            CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(zip(texts, finishes))])

    async def _stream(self, body, prompt, first, events, route, start):
        """Server-sent events: a chunk per text delta, a usage chunk, then `data: [DONE]`. An error
        after the 200 went out (a timeout) is an error event, and the stream ends without [DONE]."""
        chat = route == "chat"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.model, "system_fingerprint": first[3].get("version", "")}
        infos, texts = [None] * body.n, [""] * body.n

        def chunk(choices, **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        async def all_events():
            yield first
            async for event in events:
                yield event

        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(body.n)])
        try:
            async for index, delta, finish, info in all_events():
                infos[index] = info
                texts[index] += delta
                if chat:
                    yield chunk([{"index": index, "delta": {"content": delta} if delta else {}, "finish_reason": finish}])
                else:
                    yield chunk([{"index": index, "text": delta, "finish_reason": finish, "logprobs": None}])
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        self._record(infos, start)
        await self._remember(head["id"], body, texts[0], head["system_fingerprint"])
        completion = sum(i["completion_tokens"] for i in infos)
        yield chunk([], usage={"prompt_tokens": len(prompt), "completion_tokens": completion,
                               "total_tokens": len(prompt) + completion})
        yield "data: [DONE]\n\n"

    async def _remember(self, completion_id: str, body, text: str, version: str) -> None:
        """Keep the completion (its first choice) for feedback to refer to, before the client has
        its id. A collector that fails costs the feedback on this completion, not the completion."""
        prompt = body.prompt if isinstance(body, CompletionRequest) else \
            json.dumps([m.model_dump() for m in body.messages])
        collector = self.collectors[shard_of(completion_id, len(self.collectors))]
        try:
            await collector.remember.remote(completion_id, prompt, text, version)
        except Exception:
            logger.exception(f"could not keep completion {completion_id} for feedback")

    def _record(self, infos: list[dict], start: float) -> None:
        for info in infos:
            if "first_token" in info:
                self.metrics.ttft.observe(info["first_token"] - start)
            if info["completion_tokens"]:
                self.metrics.tokens.inc(info["completion_tokens"])
        self.metrics.latency.observe(time.perf_counter() - start)


OpenAIIngressDeployment = serve.deployment(serve.ingress(app)(OpenAIIngress), name="OpenAIIngress")
