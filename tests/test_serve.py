"""The Serve application over real HTTP: the official openai client, greedy equality with the engine,
quantized replicas, bad input, overload, timeouts and the API key."""

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from openai import OpenAI

from deepkiln.config import load_config
from deepkiln.engine import Engine, SamplingParams
from deepkiln.precision import compute_dtype
from deepkiln.quantize import load_quantized
from deepkiln.testing import free_port
from deepkiln.tokenizer import BOS_ID, EOS_ID

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]
MODEL = "deepkiln"


@pytest.fixture(scope="module")
def run(served_run):
    """The session's trained tiny model quantized to bf16, int8 and nf4, and its tokenizer."""
    return served_run


@pytest.fixture(scope="module")
def http(run, tmp_path_factory):
    """Serve on a free port of 127.0.0.1 for this module; `deploy(*overrides)` deploys the app with a
    config and returns the base URL. The same overrides twice keep the running app (a redeploy
    replaces every replica); a test that changes the app itself calls `deploy.changed()`. Feedback
    goes to a store of the module's own: the session's run stays as it was."""
    from ray import serve

    from serve.app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = f"--feedback.store={tmp_path_factory.mktemp('feedback')}"
    current = {"overrides": None}

    def deploy(*overrides):
        if overrides != current["overrides"]:
            cfg = load_config(run["argv"] + ["--serve.replica_cpus=0.5", store, *overrides])
            serve.run(build(cfg), name="deepkiln", route_prefix="/")
            current["overrides"] = overrides
        return f"http://127.0.0.1:{port}"

    deploy.changed = lambda: current.update(overrides=None)
    deploy.store = store
    yield deploy
    serve.shutdown()


# The app most tests share: bf16 weights, small limits for the bad-input test.
BASE = ("--quant.format=bf16", "--serve.max_body_bytes=20000", "--serve.max_tokens=64", "--feedback.max_text_chars=200")


def handle(name):
    from ray import serve

    return serve.get_deployment_handle(name, app_name="deepkiln")


def post(url, body, **kw):
    return requests.post(url, data=body if isinstance(body, bytes) else json.dumps(body),
                         headers={"Content-Type": "application/json", **kw.pop("headers", {})}, timeout=120, **kw)


def test_openai_client_lists_completes_chats_and_streams(http, run):
    client = OpenAI(base_url=http(*BASE) + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]

    c = client.completions.create(model=MODEL, prompt="The people", max_tokens=8, temperature=0)
    assert c.id.startswith("cmpl-") and c.model == MODEL and c.system_fingerprint.startswith("bf16-")
    prompt_tokens = 1 + len(run["tokenizer"].encode("The people"))
    assert c.usage.prompt_tokens == prompt_tokens
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8 or \
        c.choices[0].finish_reason == "stop" and c.usage.completion_tokens < 8

    messages = [{"role": "user", "content": "Tell me about the river"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert chat.id.startswith("chatcmpl-") and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(run["tokenizer"].apply_chat_template(messages))

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-") and chunks[0].id != chat.id
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content  # greedy: streamed and whole answers agree
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == chat.usage.model_dump()
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [chat.choices[0].finish_reason]

    raw = post(str(client.base_url).rstrip("/") + "/chat/completions",
               {"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True})
    assert raw.text.rstrip().endswith("data: [DONE]")


def served_dtype(run):
    """The compute dtype the app's replicas resolve on this machine (serve.dtype)."""
    return compute_dtype(load_config(run["argv"]).serve.dtype)


def engine_output(run, fmt, prompt, max_tokens) -> list[int]:
    """Greedy completion token ids of `prompt` from the engine directly, on the `fmt` artifact."""
    model, _ = load_quantized(run["report"]["formats"][fmt]["path"], served_dtype(run))
    req = Engine(model, max_batch=1).generate([[BOS_ID, *run["tokenizer"].encode(prompt)]],
                                              SamplingParams(max_tokens=max_tokens, temperature=0,
                                                             stop_token_ids=(EOS_ID,)))[0]
    return req.output


def expected_text(run, fmt, prompt, max_tokens) -> str:
    return run["tokenizer"].decode(engine_output(run, fmt, prompt, max_tokens))


def test_greedy_through_serve_equals_the_engine(http, run):
    url = http(*BASE)
    for prompt in ("The people", "A river and a bridge"):
        output = engine_output(run, "bf16", prompt, 12)
        r = post(url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == run["tokenizer"].decode(output)
        assert r.json()["usage"]["completion_tokens"] == len(output)


def test_prometheus_metrics_count_requests_errors_tokens_and_name_the_version(http, run):
    import re

    import ray

    url = http(*BASE)
    version = handle("LLMServer").info.remote().result()["version"]
    body = {"model": MODEL, "prompt": "The people", "max_tokens": 8, "temperature": 0, "stream": True}
    for _ in range(3):
        assert post(url + "/v1/completions", body).status_code == 200
    assert post(url + "/v1/completions", {**body, "temperature": 7}).status_code == 400
    port = ray._private.worker.global_worker.node.metrics_export_port

    def value(text, name, **tags):  # sum of the samples of `name` whose tags include `tags`
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"{name}{{(.*)}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in tags.items()):
                total += float(m.group(2))
        return total

    deadline = time.monotonic() + 60  # Ray's metrics agent exports every few seconds
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        done = (value(text, "ray_deepkiln_serve_requests_total", route="completions", code="200") >= 3
                and value(text, "ray_deepkiln_serve_requests_total", route="completions", code="400") >= 1
                and value(text, "ray_deepkiln_serve_model_version", version=version) == 1)
        if done or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done, [line for line in text.splitlines() if "deepkiln" in line]
    assert value(text, "ray_deepkiln_serve_time_to_first_token_s_count") >= 3
    assert value(text, "ray_deepkiln_serve_completion_tokens_total") >= 3
    for gauge in ("queue_depth", "batch_size", "tokens_per_s"):
        assert f"ray_deepkiln_serve_{gauge}" in text, gauge


def test_bad_input_is_a_4xx_naming_the_field(http, run):
    url = http(*BASE)
    pid = handle("OpenAIIngress").pid.remote().result()
    ok = {"model": MODEL, "prompt": "The people"}
    context = load_config(run["argv"]).model.max_seq_len
    words = 1
    while len(run["tokenizer"].encode("river " * words)) < context - 40:
        words += 1
    fits = "river " * words  # fits the context alone, not with 64 more tokens
    cases = [  # body, status, words the message must hold
        (b'{"model": "deepkiln", "prompt": ', 400, "JSON"),
        (b'\xff\xfe{"model": 1}', 400, "UTF-8"),
        (b'[1, 2]', 400, "object"),
        ({"prompt": "x"}, 400, "model"),
        ({"model": MODEL}, 400, "prompt"),
        ({**ok, "prompt": 7}, 400, "prompt"),
        ({**ok, "max_tokens": "ten"}, 400, "max_tokens"),
        ({**ok, "model": "gpt-4"}, 404, "gpt-4"),
        ({**ok, "max_tokens": -1}, 400, "max_tokens"),
        ({**ok, "max_tokens": 10 ** 9}, 400, "max_tokens"),
        ({**ok, "temperature": 2.5}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "n": 99}, 400, "n="),
        ({**ok, "stop": [""]}, 400, "stop"),
        ({**ok, "prompt": fits * 2}, 400, "context length"),
        ({**ok, "prompt": "x" * 30000}, 413, "max_body_bytes"),
    ]
    for body, status, words in cases:
        r = post(url + "/v1/completions", body)
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:80], r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["type"], (words, err)
    messages = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}
    r = post(url + "/v1/chat/completions", messages)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    over = post(url + "/v1/completions", {**ok, "prompt": fits, "max_tokens": 64})
    assert over.status_code == 400 and "max_tokens is 64" in over.json()["error"]["message"], over.text
    assert handle("OpenAIIngress").pid.remote().result() == pid  # the replica survived all of it
    r = post(url + "/v1/completions", {**ok, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_feedback_is_stored_once_joined_to_the_completion_and_bad_feedback_is_a_4xx(http, run):
    url = http(*BASE)
    c = post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 6}).json()
    chat = post(url + "/v1/chat/completions", {"model": MODEL, "stream": True, "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "Hi"}]})
    chat_id = json.loads(chat.text.split("\n\n")[0][6:])["id"]
    good = {"feedback_id": "fb-1", "completion_id": c["id"], "rating": 4, "correction": "Mail bo@example.org"}
    first = post(url + "/v1/feedback", good)
    assert first.status_code == 200 and first.json()["duplicate"] is False, first.text
    again = post(url + "/v1/feedback", good)
    assert again.status_code == 200 and again.json() == {**first.json(), "duplicate": True}
    assert post(url + "/v1/feedback", {"feedback_id": "fb-2", "completion_id": chat_id, "rating": "down"}).status_code == 200
    for body, status, field in [
        ({**good, "feedback_id": "x", "completion_id": "cmpl-unknown"}, 404, "completion_id"),
        ({**good, "feedback_id": "x", "rating": 11}, 400, "rating"),
        ({**good, "feedback_id": "x", "correction": "y" * 201}, 400, "correction"),
        ({k: v for k, v in good.items() if k != "feedback_id"}, 400, "feedback_id"),
        ({**good, "feedback_id": "x", "rating": "4"}, 400, "rating"),
    ]:
        r = post(url + "/v1/feedback", body)
        assert r.status_code == status and r.json()["error"]["param"] == field, (body, r.text)
        assert field in r.json()["error"]["message"]
    from actors.feedback import collectors
    from deepkiln.paths import absolute

    [collector] = collectors(absolute(load_config(run["argv"] + [http.store, *BASE])))
    import ray

    stored = {r["feedback_id"]: r for r in ray.get(collector.records.remote())}
    assert set(stored) == {"fb-1", "fb-2"}  # nothing stored for the bad ones
    assert stored["fb-1"]["prompt"] == "The people" and stored["fb-1"]["completion"] == c["choices"][0]["text"]
    assert stored["fb-1"]["model_version"] == c["system_fingerprint"] and "<EMAIL>" in stored["fb-1"]["correction"]
    assert json.loads(stored["fb-2"]["prompt"]) == [{"role": "user", "content": "Hi"}] and stored["fb-2"]["rating"] == 1


def test_killed_replica_is_replaced_and_the_load_finishes_with_retries(http):
    import os
    import signal

    url = http(*BASE)
    victim = handle("LLMServer").info.remote().result()["pid"]
    failures = []

    def one(i):
        if i == 6:
            os.kill(victim, signal.SIGKILL)
        for attempt in range(60):  # a client that retries failed requests, as OpenAI's own does
            try:
                r = post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 16})
            except requests.ConnectionError as e:
                failures.append(repr(e))
            else:
                if r.status_code == 200:
                    return attempt
                assert r.status_code >= 500, r.text  # never a 4xx for a good request
                failures.append(r.status_code)
            time.sleep(0.5)
        raise AssertionError(f"request {i} never succeeded: {failures}")

    with ThreadPoolExecutor(4) as pool:
        attempts = list(pool.map(one, range(24)))
    assert len(attempts) == 24
    assert handle("LLMServer").info.remote().result()["pid"] != victim  # Serve replaced the replica


def test_version_switch_under_load_drops_nothing(http, run):
    """Redeployed with serve.run, Serve replaces the replicas (a rolling update); `serve deploy` of a
    changed user_config reconfigures them in place (test_reconfigure_*)."""
    from ray import serve

    from serve.app import build

    url = http(*BASE)
    before = handle("LLMServer").info.remote().result()
    body = {"model": MODEL, "prompt": "The people", "max_tokens": 24, "temperature": 0}
    want = {fmt: expected_text(run, fmt, "The people", 24) for fmt in ("bf16", "nf4")}

    def one(i):
        if i == 8:  # publish the nf4 artifact while requests are in flight
            cfg = load_config(run["argv"] + ["--serve.replica_cpus=0.5", http.store, *BASE])
            serve.run(build(cfg, artifact=run["report"]["formats"]["nf4"]["path"]), name="deepkiln", route_prefix="/")
        return post(url + "/v1/completions", body)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, range(20)))
    http.changed()
    assert [r.status_code for r in responses] == [200] * 20
    after = handle("LLMServer").info.remote().result()
    assert after["version"].startswith("nf4-")
    seen = {r.json()["system_fingerprint"] for r in responses}
    assert before["version"] in seen
    for r in responses:  # each answer is what the version it names produces
        fmt = "bf16" if r.json()["system_fingerprint"] == before["version"] else "nf4"
        assert r.json()["system_fingerprint"] in (before["version"], after["version"])
        assert r.json()["choices"][0]["text"] == want[fmt]
    last = post(url + "/v1/completions", body).json()
    assert last["system_fingerprint"] == after["version"] and last["choices"][0]["text"] == want["nf4"]


@pytest.mark.parametrize("fmt, layer", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_replicas_run_bitsandbytes_layers(http, run, fmt, layer):
    url = http(f"--quant.format={fmt}")
    info = handle("LLMServer").info.remote().result()
    assert info["version"].startswith(f"{fmt}-") and info["layers"].get(layer, 0) > 0
    assert info["weight_bytes"] == run["report"]["formats"][fmt]["bytes_in_memory"]
    assert info["weight_bytes"] < run["report"]["formats"]["bf16"]["bytes_in_memory"]
    r = post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["system_fingerprint"] == info["version"]


def test_overload_gets_503_quickly_and_the_rest_complete(http):
    url = http("--quant.format=bf16", "--serve.max_batch=1", "--serve.max_queue=1")

    def one(_):
        start = time.perf_counter()
        r = post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 48,
                                           "temperature": 0})
        return r.status_code, r.headers.get("retry-after"), time.perf_counter() - start

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = [c for c, _, _ in results]
    assert set(codes) == {200, 503}, codes
    assert all(ra == "1" for c, ra, _ in results if c == 503)
    rejected = max(t for c, _, t in results if c == 503)
    served = sorted(t for c, _, t in results if c == 200)
    assert rejected < served[-1]  # turned away without waiting for a slot


def test_a_request_over_its_time_gets_408(http):
    url = http("--quant.format=bf16", "--serve.request_timeout_s=0.05")
    body = {"model": MODEL, "prompt": "The people", "max_tokens": 200, "temperature": 0}
    r = post(url + "/v1/completions", body)
    assert r.status_code == 408 and "request_timeout_s" in r.json()["error"]["message"]
    # Streamed: a 408 if even the first token is late; once the 200 went out, an error event ends it.
    streamed = post(url + "/v1/completions", {**body, "stream": True})
    if streamed.status_code != 408:
        events = [line for line in streamed.text.splitlines() if line]
        assert streamed.status_code == 200 and "data: [DONE]" not in events
        assert json.loads(events[-1][len("data: "):])["error"]["code"] == "timeout"


def test_api_key_guards_every_route_but_health(http, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret-key\n")
    url = http("--quant.format=bf16", f"--serve.api_key_file={key}")
    body = {"model": MODEL, "prompt": "The people", "max_tokens": 2}
    assert requests.get(url + "/health", timeout=30).status_code == 200
    assert requests.get(url + "/v1/models", timeout=30).status_code == 401
    assert post(url + "/v1/completions", body).status_code == 401
    wrong = post(url + "/v1/completions", body, headers={"Authorization": "Bearer s3cret-kez"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert post(url + "/v1/completions", body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    client = OpenAI(base_url=url + "/v1", api_key="s3cret-key")
    assert [m.id for m in client.models.list()] == [MODEL]


def test_reconfigure_switches_versions_and_in_flight_requests_finish_on_theirs(run):
    import asyncio

    from deepkiln.paths import absolute
    from serve.llm import LLMServer

    cfg = absolute(load_config(run["argv"] + ["--quant.format=bf16"]))
    prompt = [BOS_ID, *run["tokenizer"].encode("The people")]
    params = {"max_tokens": 24, "temperature": 0, "stop_token_ids": (EOS_ID,)}
    want = {fmt: expected_text(run, fmt, "The people", 24) for fmt in ("bf16", "nf4")}

    async def collect(server, started=None):
        items = []
        async for batch in server.generate(prompt, params):
            items += batch
            if started and any("token" in item for item in batch):
                started.set()
        tokens = [i["token"] for i in items if "token" in i]
        return items[0]["version"], run["tokenizer"].decode(tokens)

    async def scenario():
        server = LLMServer(cfg.to_dict())
        started = asyncio.Event()
        in_flight = asyncio.create_task(collect(server, started))
        await asyncio.wait_for(started.wait(), 60)  # the bf16 request is decoding
        await server.reconfigure({"artifact": run["report"]["formats"]["nf4"]["path"]})
        new = await collect(server)
        return await in_flight, new, server.info()

    (old_version, old_text), (new_version, new_text), info = asyncio.run(scenario())
    assert old_version.startswith("bf16-") and old_text == want["bf16"]
    assert new_version.startswith("nf4-") and new_text == want["nf4"] and info["version"] == new_version
    assert info["layers"].get("Linear4bit", 0) > 0 and info["running"] == 0


def test_a_replica_that_fails_before_its_first_message_is_retried_and_one_after_is_not():
    import asyncio

    from ray.exceptions import ActorDiedError

    from serve.api import RETRIES, OpenAIIngress

    class Stream:  # what a streaming DeploymentHandle call returns: messages, then maybe a failure
        def __init__(self, messages, fail):
            self.messages, self.fail, self.cancelled = list(messages), fail, False

        def __aiter__(self):
            return self

        async def __anext__(self):
            if self.messages:
                return self.messages.pop(0)
            if self.fail:
                raise ActorDiedError()
            raise StopAsyncIteration

        def cancel(self):
            self.cancelled = True

    class Handle:  # LLMServer's handle: each generate call takes the next planned stream
        def __init__(self, plan):
            self.plan, self.calls = plan, []
            self.generate = self

        def options(self, **kw):
            return self

        def remote(self, prompt, params):
            self.calls.append(self.plan.pop(0))
            return self.calls[-1]

    async def messages(plan):
        ingress = OpenAIIngress.__new__(OpenAIIngress)
        ingress.llm = Handle(plan)
        got = [items async for items in ingress._generate([1, 2], {})]
        return got, ingress.llm.calls

    answer = [[{"version": "v"}], [{"token": 7}, {"finish_reason": "stop"}]]
    got, calls = asyncio.run(messages([Stream([], True), Stream([], True), Stream(answer, False)]))
    assert got == answer and len(calls) == 3
    assert [c.cancelled for c in calls] == [True, True, False]  # a finished call needs no cancel

    async def first_message_only(plan):  # the caller leaves mid-stream (a disconnect, a timeout)
        ingress = OpenAIIngress.__new__(OpenAIIngress)
        ingress.llm = Handle(plan)
        async with contextlib.aclosing(ingress._generate([1, 2], {})) as gen:
            await anext(gen)
        return ingress.llm.calls

    assert asyncio.run(first_message_only([Stream(answer, False)]))[0].cancelled
    with pytest.raises(ActorDiedError):  # tokens already went out: not retried
        asyncio.run(messages([Stream(answer[:1], True), Stream(answer, False)]))
    with pytest.raises(ActorDiedError):  # a replica failing every time: an error, not a loop
        asyncio.run(messages([Stream([], True) for _ in range(RETRIES + 1)]))


@pytest.mark.parametrize("interval_ms", [0, 60_000])
def test_tokens_go_out_first_at_once_then_batched_by_the_stream_interval(run, interval_ms):
    import asyncio

    from deepkiln.paths import absolute
    from serve.llm import LLMServer

    cfg = absolute(load_config(run["argv"] + ["--quant.format=bf16", f"--serve.stream_interval_ms={interval_ms}"]))
    prompt = [BOS_ID, *run["tokenizer"].encode("The people")]
    params = {"max_tokens": 12, "temperature": 0, "stop_token_ids": ()}

    async def messages():
        return [batch async for batch in LLMServer(cfg.to_dict()).generate(prompt, params)]

    got = asyncio.run(messages())
    tokens = [[i["token"] for i in batch if "token" in i] for batch in got]
    model, _ = load_quantized(run["report"]["formats"]["bf16"]["path"], served_dtype(run))
    assert sum(tokens, []) == Engine(model, max_batch=1).generate([prompt], SamplingParams(**params))[0].output
    assert "version" in got[0][0] and tokens[0] == [tokens[0][0]]  # the first token alone, at once
    assert got[-1][-1] == {"finish_reason": "length"}
    if interval_ms:  # everything after the first token waited for the end of the request
        assert len(got) == 2 and len(tokens[1]) == 11
    else:  # one message per engine step
        assert len(got) == 12 and all(len(t) == 1 for t in tokens)


def test_response_cache_answers_a_repeated_deterministic_request_and_is_keyed_on_the_version(run):
    import asyncio

    from deepkiln.paths import absolute
    from serve.llm import LLMServer

    cfg = absolute(load_config(run["argv"] + ["--quant.format=bf16", "--serve.response_cache=2"]))
    prompt = [BOS_ID, *run["tokenizer"].encode("The people")]
    greedy = {"max_tokens": 12, "temperature": 0, "stop_token_ids": (EOS_ID,)}
    sampled = {**greedy, "temperature": 1.0}

    async def items(server, params, p=prompt):
        return [i for batch in [b async for b in server.generate(p, params)] for i in batch]

    async def scenario():
        server = LLMServer(cfg.to_dict())
        first, again = await items(server, greedy), await items(server, greedy)
        hits = server.info()["cache_hits"]
        await items(server, sampled), await items(server, sampled)           # unseeded: never cached
        seeded = [await items(server, {**sampled, "seed": 3}) for _ in range(2)]
        after_sampling = server.info()["cache_hits"]
        for other in ([BOS_ID, 7], [BOS_ID, 8]):                             # evicts the greedy entry (LRU of 2)
            await items(server, greedy, other)
        evicted = await items(server, greedy)
        await server.reconfigure({"artifact": run["report"]["formats"]["nf4"]["path"]})
        on_nf4 = await items(server, greedy)
        return first, again, hits, seeded, after_sampling, evicted, on_nf4, server.info()

    first, again, hits, seeded, after_sampling, evicted, on_nf4, info = asyncio.run(scenario())
    assert again == first and hits == 1
    assert seeded[0] == seeded[1] and after_sampling == 2
    assert evicted == first and info["cache_entries"] == 2
    assert on_nf4[0]["version"].startswith("nf4-") and info["cache_hits"] == 2  # a new version misses
    tokens = [i["token"] for i in on_nf4 if "token" in i]
    assert run["tokenizer"].decode(tokens) == expected_text(run, "nf4", "The people", 12)


def test_a_dead_engine_process_fails_its_requests_at_once_and_the_next_request_starts_a_new_one(run):
    import asyncio
    import os
    import signal

    from deepkiln.paths import absolute
    from serve.llm import LLMServer

    cfg = absolute(load_config(run["argv"] + ["--quant.format=bf16"]))
    prompt = [BOS_ID, *run["tokenizer"].encode("The people")]
    long = {"max_tokens": 200, "temperature": 0, "stop_token_ids": ()}  # still decoding when the process dies
    short = {**long, "max_tokens": 40}

    async def collect(server, params, started=None):
        items = []
        async for batch in server.generate(prompt, params):
            items += batch
            if started:
                started.set()
        return items

    async def scenario():
        server = LLMServer(cfg.to_dict())
        started = asyncio.Event()
        in_flight = [asyncio.create_task(collect(server, long, started)) for _ in range(3)]
        await asyncio.wait_for(started.wait(), 60)  # decoding in the engine process
        victim = server.info()["engine_pid"]
        os.kill(victim, signal.SIGKILL)
        failed = await asyncio.wait_for(asyncio.gather(*in_flight), 30)
        after = await asyncio.wait_for(collect(server, short), 120)
        return victim, failed, after, server.info()

    victim, failed, after, info = asyncio.run(scenario())
    for items in failed:  # each answered with an error, none left waiting
        assert items[-1]["error"] == "internal" and "engine process exited" in items[-1]["message"]
        assert sum("token" in i for i in items) < 200
    assert after[-1] == {"finish_reason": "length"} and sum("token" in i for i in after) == 40
    assert info["engine_pid"] != victim and info["pid"] == os.getpid()


def test_the_engine_process_exits_with_its_replica(run, tmp_path):
    """A replica SIGKILLed (no __del__, no "stop") leaves no engine process behind."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from deepkiln.paths import absolute

    cfg = absolute(load_config(run["argv"] + ["--quant.format=bf16"]))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    script = ("import json, sys, time\nfrom serve.llm import LLMServer\n"
              f"s = LLMServer(json.load(open({str(tmp_path / 'cfg.json')!r})))\n"
              "print(s.info()['engine_pid'], flush=True)\ntime.sleep(600)\n")
    replica = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    engine_pid = int(replica.stdout.readline())
    assert psutil.pid_exists(engine_pid)
    os.kill(replica.pid, signal.SIGKILL)
    replica.wait()
    psutil.Process(engine_pid).wait(timeout=30)  # raises TimeoutExpired if it lingers


def test_500_feedback_posts_with_the_collector_killed_twice_are_each_stored_once(http, run, tmp_path):
    import os
    import signal
    import threading

    import ray

    from actors.feedback import collectors
    from deepkiln.paths import absolute

    store = f"--feedback.store={tmp_path / 'feedback'}"  # a collector of its own
    url = http("--quant.format=bf16", store)
    completion = post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 2}).json()["id"]
    [collector] = collectors(absolute(load_config(run["argv"] + [store])))
    pid = lambda: ray.get(collector.__ray_call__.remote(lambda self: os.getpid()))  # noqa: E731
    done, killed, failures = [], [], []

    def send(i):
        body = {"feedback_id": f"fb-{i}", "completion_id": completion, "rating": 1 + i % 5}
        for _ in range(60):  # a client that retries until it gets an answer
            try:
                r = post(url + "/v1/feedback", body)
            except requests.ConnectionError as e:
                failures.append(repr(e))
            else:
                if r.status_code == 200:
                    done.append(i)
                    return r.json()
                assert r.status_code >= 500, r.text  # never a 4xx for good feedback
                failures.append(r.status_code)
            time.sleep(0.2)
        raise AssertionError(f"feedback {i} was never acknowledged: {failures[-3:]}")

    def killer():
        for at in (120, 320):
            while len(done) < at:
                time.sleep(0.005)
            killed.append(pid())
            os.kill(killed[-1], signal.SIGKILL)

    victims = threading.Thread(target=killer)
    victims.start()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(500)))
    victims.join()
    assert len(set(killed)) == 2 and pid() not in killed  # two collector processes died mid-load
    assert sorted(done) == list(range(500))  # every client got its success
    assert ray.get(collector.count.remote()) == 500 and ray.get(collector.integrity.remote()) == "ok"
    assert len({a["seq"] for a in answers}) == 500  # one stored record each: re-sends were absorbed
