"""The Serve application over real HTTP: the official openai client, greedy equality with the engine,
quantized replicas, bad input, overload, timeouts and the API key."""

import contextlib
import dataclasses
import hashlib
import json
import re
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
from serve.api import source_of
from serve.protocol import Failed, Finished, Started, Tokens

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
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-") and chunks[0].id != chat.id
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content  # greedy: streamed and whole answers agree
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == chat.usage.model_dump()
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [chat.choices[0].finish_reason]

    raw = post(str(client.base_url).rstrip("/") + "/chat/completions",
               {"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True})
    assert raw.text.rstrip().endswith("data: [DONE]")
    # OpenAI sends the usage chunk only when asked (stream_options.include_usage).
    assert '"usage"' not in raw.text
    quiet = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True,
                                                stream_options={"include_usage": False}))
    assert all(ch.usage is None for ch in quiet) and all(ch.choices for ch in quiet)


def test_the_openai_parameters_clients_send_are_honoured(http, run):
    client = OpenAI(base_url=http(*BASE) + "/v1", api_key="unused")
    # max_completion_tokens (what newer SDKs send instead of max_tokens) bounds the completion.
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "The river"}],
                                          max_completion_tokens=16, temperature=0.9, seed=1)
    assert 0 < chat.usage.completion_tokens <= 16
    # Content as a list of text parts is the same as the joined string.
    parts = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "text", "text": "The "}, {"type": "text", "text": "river"}]}])
    plain = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "The river"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    # Log-probabilities, in the client's own types: completions and chat.
    c = client.completions.create(model=MODEL, prompt="The people", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert "".join(lp.tokens) == c.choices[0].text and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-6 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "The river"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[-1].logprob and content[0].bytes is not None
    # echo: the prompt before the completion, with its log-probabilities (each prompt token's given
    # what precedes it, the first one's given BOS; a prompt of ids without BOS has none for its first).
    e = client.completions.create(model=MODEL, prompt="The people", max_tokens=4, temperature=0, echo=True, logprobs=0)
    prompt_tokens = len(run["tokenizer"].encode("The people"))
    elp = e.choices[0].logprobs
    assert e.choices[0].text.startswith("The people") and "".join(elp.tokens[:prompt_tokens]) == "The people"
    assert len(elp.tokens) == prompt_tokens + e.usage.completion_tokens and all(x <= 0 for x in elp.token_logprobs)
    bare = client.completions.create(model=MODEL, prompt=run["tokenizer"].encode("The people"), max_tokens=2,
                                     temperature=0, echo=True, logprobs=0)
    assert bare.choices[0].logprobs.token_logprobs[0] is None and bare.choices[0].text.startswith("The people")
    # A penalty changes greedy output on a prompt that repeats; logit_bias -100 bans a token.
    prompt = "river river river river river river"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    penalised = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                          frequency_penalty=2.0).choices[0].text
    assert penalised != greedy
    first = engine_output(run, "bf16", prompt, 12)[0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                       logit_bias={str(first): -100})
    ids = engine_output(run, "bf16", prompt, 12, logit_bias={first: -100})
    assert first not in ids and banned.choices[0].text == run["tokenizer"].decode(ids)
    # Several prompts in one completions request, as strings or token ids: n choices each.
    several = client.completions.create(model=MODEL, prompt=["The river", "A market"], max_tokens=3, n=2,
                                        temperature=0)
    assert [ch.index for ch in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text and several.choices[2].text == several.choices[3].text
    alone = client.completions.create(model=MODEL, prompt="A market", max_tokens=3, temperature=0)
    assert several.choices[2].text == alone.choices[0].text
    ids = [2, *run["tokenizer"].encode("The river")]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == several.choices[0].text
    # `user` is kept with the completion for its feedback.
    c = client.completions.create(model=MODEL, prompt="The people", max_tokens=2, user="user-42")
    assert post(http(*BASE) + "/v1/feedback", {"feedback_id": "u-1", "completion_id": c.id, "rating": 5}).status_code == 200
    stored = [r for r in stored_feedback(http, run) if r["feedback_id"] == "u-1"]
    assert stored[0]["user"] == "user-42"


def stored_feedback(http, run) -> list[dict]:
    import ray

    from actors.feedback import collectors
    from deepkiln.paths import absolute

    [collector] = collectors(absolute(load_config(run["argv"] + [http.store, *BASE])))
    return ray.get(collector.records.remote())


SURROGATE = "\\ud800"  # a lone UTF-16 surrogate as JSON writes it: valid JSON, not text


def test_hostile_and_unusual_input_gets_a_4xx_never_a_5xx(http, run):
    import random

    url = http(*BASE)
    ok = {"model": MODEL, "prompt": "The people", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    completion = post(url + "/v1/completions", ok).json()["id"]
    raw = [  # (route, body as bytes, status, the field the 400 names or None)
        ("completions", b'{"model": "deepkiln", "prompt": "' + SURROGATE.encode() + b'"}', 400, "prompt"),
        ("chat", b'{"model": "deepkiln", "messages": [{"role": "user", "content": "a' + SURROGATE.encode() + b'"}]}',
         400, "messages.0.content"),
        ("chat", b'{"model": "deepkiln", "messages": [{"role": "user", "content": [{"type": "text", "text": "'
         + SURROGATE.encode() + b'"}]}]}', 400, "messages.0.content.0.text"),
        ("completions", b'{"model": "deepkiln", "prompt": "x", "stop": ["' + SURROGATE.encode() + b'"]}', 400, "stop.0"),
        ("completions", b'{"model": "deepkiln", "prompt": "x", "user": "' + SURROGATE.encode() + b'"}', 400, "user"),
        ("feedback", b'{"feedback_id": "f", "completion_id": "' + SURROGATE.encode() + b'", "rating": 1}', 400,
         "completion_id"),
        ("feedback", b'{"feedback_id": "f", "completion_id": "' + completion.encode() + b'", "rating": 1, '
         b'"correction": "' + SURROGATE.encode() + b'"}', 400, "correction"),
        ("completions", b'{"model": "deepkiln", "prompt": ' + b"[" * 9_000 + b"]" * 9_000 + b"}", 400, None),
        ("completions", b'{"model": "deepkiln", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),
        ("completions", b'{"model": "deepkiln", "prompt": "x", "temperature": NaN}', 400, "temperature"),
        ("completions", b'{"model": "deepkiln", "prompt": "x", "logit_bias": {"5": Infinity}}', 400, "logit_bias"),
    ]
    for route, body, status, param in raw:
        r = post(url + ("/v1/" + route if route != "chat" else "/v1/chat/completions"), body)
        assert r.status_code == status, (route, body[:120], r.text)
        assert param is None or r.json()["error"]["param"] == param, (body[:120], r.text)
    cases = [  # (route, body, status, named parameter)
        ("completions", {**ok, "seed": 2**64 - 1, "n": 2}, 200, None),
        ("completions", {**ok, "seed": 2**64}, 400, "seed"),
        ("completions", {**ok, "prompt": [[2, 10**6]]}, 400, "prompt"),
        ("completions", {**ok, "prompt": []}, 400, "prompt"),
        ("completions", {**ok, "logit_bias": {"999999": 5}}, 400, "logit_bias"),
        ("completions", {**ok, "logit_bias": {"x": 5}}, 400, "logit_bias.x"),
        ("completions", {**ok, "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ("completions", {**ok, "best_of": 3}, 400, None),
        ("completions", {**ok, "suffix": "end"}, 400, None),
        ("completions", {**ok, "frobnicate": 1}, 400, "frobnicate"),
        ("completions", {**ok, "stream": True, "echo": True, "logprobs": 1}, 400, None),
        ("chat", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("chat", {**chat, "tool_choice": "auto"}, 400, "tool_choice"),
        ("chat", {**chat, "response_format": {"type": "json_object"}}, 400, "response_format.type"),
        ("chat", {**chat, "top_logprobs": 2}, 400, None),
        ("chat", {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, None),
        ("chat", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, 200, None),
    ]
    for route, body, status, param in cases:
        r = post(url + ("/v1/completions" if route == "completions" else "/v1/chat/completions"), body)
        assert r.status_code == status, (body, r.text)
        if status >= 400 and param:
            assert r.json()["error"]["param"] == param, (body, r.text)
    # A fuzz over every request field with values of every JSON shape: a 2xx or a 4xx, never a 5xx,
    # and no Python exception text in any body.
    rng = random.Random(0)
    values = [None, True, -1, 0, 3, 2**70, -(2**70), 1e308, -0.0, 0.5, "", "x" * 3, "\ud83d", "\x00", [], [1, "a"],
              [[1]], {}, {"a": {"b": [1]}}, [2] * 3, ["a", "b"]]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
              "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
              "logprobs", "top_logprobs", "echo", "user", "best_of", "suffix", "response_format", "tools"]
    for i in range(150):
        route, base = ("completions", ok) if i % 2 else ("chat", chat)
        body = dict(base)
        for field in rng.sample(fields, rng.randint(1, 3)):
            body[field] = rng.choice(values)
        r = post(url + ("/v1/completions" if route == "completions" else "/v1/chat/completions"), body)
        assert r.status_code < 500, (body, r.text)
        assert not re.search(r"Error\(|Traceback|Exception", r.text), (body, r.text)


def served_dtype(run):
    """The compute dtype the app's replicas resolve on this machine (serve.dtype)."""
    return compute_dtype(load_config(run["argv"]).serve.dtype)


def engine_output(run, fmt, prompt, max_tokens, **params) -> list[int]:
    """Greedy completion token ids of `prompt` from the engine directly, on the `fmt` artifact."""
    model, _ = load_quantized(run["report"]["formats"][fmt]["path"], served_dtype(run))
    req = Engine(model, max_batch=1, vocab_size=run["tokenizer"].vocab_size).generate(
        [[BOS_ID, *run["tokenizer"].encode(prompt)]],
        SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=(EOS_ID,), **params))[0]
    return req.output


def expected_text(run, fmt, prompt, max_tokens) -> str:
    return run["tokenizer"].decode(engine_output(run, fmt, prompt, max_tokens))


def ids_of(items, index=0) -> list[int]:
    """The token ids of choice `index` in a list of stream items."""
    return [t for i in items if isinstance(i, Tokens) and i.index == index for t in i.ids]


def generate(server, prompt, params, n=1):
    """LLMServer.generate for one prompt."""
    return server.generate((tuple(prompt),), params, n)


def test_greedy_through_serve_equals_the_engine(http, run):
    url = http(*BASE)
    for prompt in ("The people", "A river and a bridge"):
        output = engine_output(run, "bf16", prompt, 12)
        r = post(url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == run["tokenizer"].decode(output)
        assert r.json()["usage"]["completion_tokens"] == len(output)


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
        ({**good, "rating": 5}, 409, "feedback_id"),  # a stored id with another payload
        ({**good, "completion_id": chat_id}, 409, "feedback_id"),
    ]:
        r = post(url + "/v1/feedback", body)
        assert r.status_code == status and r.json()["error"]["param"] == field, (body, r.text)
        assert field in r.json()["error"]["message"]
    stored = {r["feedback_id"]: r for r in stored_feedback(http, run)}
    assert "x" not in stored and {"fb-1", "fb-2"} <= set(stored)  # nothing stored for the bad ones
    assert sum(r["feedback_id"] == "fb-1" for r in stored_feedback(http, run)) == 1
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
    """Redeployed with serve.run, Serve replaces the replicas (a rolling update): the one way a new
    version is published (pipelines.online does it from the running app's own settings)."""
    from pipelines import online

    url = http(*BASE)
    before = handle("LLMServer").info.remote().result()
    body = {"model": MODEL, "prompt": "The people", "max_tokens": 24, "temperature": 0}
    want = {fmt: expected_text(run, fmt, "The people", 24) for fmt in ("bf16", "nf4")}

    def one(i):
        if i == 8:  # publish the nf4 artifact while requests are in flight, as the online loop does
            assert online.publish(run["report"]["formats"]["nf4"]["path"])
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
    # Only the artifact changed: the app's own limits (BASE's, not the defaults) and store stand.
    over = post(url + "/v1/completions", {**body, "max_tokens": 65})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens", over.text
    settings = handle("OpenAIIngress").settings.remote().result()["config"]
    assert settings["serve"]["max_body_bytes"] == 20000 and settings["feedback"]["store"] == http.store.split("=", 1)[1]


def scrape(name: str, until, timeout: float = 60.0) -> str:
    """Ray's metrics endpoint, polled until `until(value)` holds (the agent exports every few
    seconds); `value(metric, **tags)` sums the samples of a metric whose tags include `tags`."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port

    def value(metric, **tags):
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"ray_deepkiln_serve_{metric}{{(.*)}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in tags.items()):
                total += float(m.group(2))
        return total

    deadline = time.monotonic() + timeout
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if until(value) or time.monotonic() > deadline:
            assert until(value), (name, [line for line in text.splitlines() if "deepkiln" in line])
            return value
        time.sleep(1)


def test_prometheus_metrics_count_every_response_name_the_version_from_the_start_and_go_idle(http, run):
    import os
    import signal
    import threading

    url = http("--quant.format=int8")  # fresh replicas on a version the tests before did not serve
    version = handle("LLMServer").info.remote().result()["version"]
    scrape("version before any request", lambda value: value("model_version", version=version) == 1)
    body = {"model": MODEL, "prompt": "The people", "max_tokens": 8, "temperature": 0, "stream": True}
    for _ in range(3):
        assert post(url + "/v1/completions", body).status_code == 200
    assert post(url + "/v1/completions", {**body, "temperature": 7}).status_code == 400
    # A 500 (the engine process killed under a request) is counted too, and says only "internal error".
    # The engine is stopped first, so the request is surely in it when it dies.
    engine = handle("LLMServer").info.remote().result()["engine_pid"]
    os.kill(engine, signal.SIGSTOP)
    threading.Timer(1.0, os.kill, (engine, signal.SIGKILL)).start()
    failed = post(url + "/v1/completions", {**body, "stream": False})
    assert failed.status_code == 500 and failed.json()["error"]["message"].startswith("internal error (request id ")
    assert failed.headers["x-deepkiln-request-id"] in failed.json()["error"]["message"]
    # Streams closed by their clients mid-way: the slots are freed and the load gauges return to zero.
    for _ in range(3):
        with requests.post(url + "/v1/completions", json={**body, "max_tokens": 60}, stream=True, timeout=60) as r:
            next(r.iter_lines())
    value = scrape("every response counted, idle gauges zero", lambda value: (
        value("requests_total", route="completions", code="200") >= 3
        and value("requests_total", route="completions", code="400") >= 1
        and value("requests_total", route="completions", code="500") >= 1
        and value("queue_depth") == 0 and value("batch_size") == 0))
    assert value("time_to_first_token_s_count") >= 3 and value("completion_tokens_total") >= 3
    assert value("tokens_per_s") >= 0


@pytest.mark.parametrize("fmt, layer", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_replicas_run_bitsandbytes_layers(http, run, fmt, layer):
    url = http(f"--quant.format={fmt}")
    info = handle("LLMServer").info.remote().result()
    assert info["version"].startswith(f"{fmt}-") and info["layers"].get(layer, 0) > 0
    assert info["weight_bytes"] == run["report"]["formats"][fmt]["bytes_in_memory"]
    assert info["weight_bytes"] < run["report"]["formats"]["bf16"]["bytes_in_memory"]
    r = post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["system_fingerprint"] == info["version"]


def test_overload_gets_503_quickly_and_a_request_of_n_choices_is_refused_whole(http, run):
    url = http("--quant.format=bf16", "--serve.max_batch=1", "--serve.max_queue=4")

    def one(n, max_tokens=48):
        start = time.perf_counter()
        r = post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": max_tokens,
                                           "temperature": 0, "n": n})
        return r.status_code, r.headers.get("retry-after"), time.perf_counter() - start, r

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, [1] * 12))
    codes = [c for c, *_ in results]
    assert set(codes) == {200, 503}, codes
    assert all(ra == "1" for c, ra, *_ in results if c == 503), [(c, ra, r.text) for c, ra, _, r in results]
    rejected = max(t for c, _, t, _ in results if c == 503)
    served = sorted(t for c, _, t, _ in results if c == 200)
    assert rejected < served[-1]  # turned away without waiting for a slot
    # n choices are admitted whole or refused whole: with 1 decoding and 2 waiting, n=4 would overfill
    # max_queue=4, so it is refused before any of its choices runs; alone, it is served.
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(one, 1, 120) for _ in range(3)]
        deadline = time.monotonic() + 60
        while handle("LLMServer").info.remote().result()["queued"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        code, retry, _, r = one(4)
        assert code == 503 and retry == "1" and "this request has 4" in r.json()["error"]["message"]
        assert all(f.result()[0] == 200 for f in busy)
    code, *_, r = one(4, 8)
    assert code == 200 and len(r.json()["choices"]) == 4 and r.json()["usage"]["completion_tokens"] <= 32


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


def test_api_key_guards_every_route_but_health(http, run, tmp_path):
    key = tmp_path / "key"
    key.write_text("# one key per client\ns3cret-key\n\nother-client-key\n")
    url = http("--quant.format=bf16", f"--serve.api_key_file={key}")
    body = {"model": MODEL, "prompt": "The people", "max_tokens": 2}
    assert requests.get(url + "/health", timeout=30).status_code == 200
    for path in ("/v1/models", "/openapi.json", "/docs", "/v1/nowhere"):
        assert requests.get(url + path, timeout=30).status_code == 401, path
    assert post(url + "/v1/completions", body).status_code == 401
    assert post(url + "/v1/feedback", {"feedback_id": "f"}).status_code == 401
    wrong = post(url + "/v1/completions", body, headers={"Authorization": "Bearer s3cret-kez"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert post(url + "/v1/completions", body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    client = OpenAI(base_url=url + "/v1", api_key="s3cret-key")
    assert [m.id for m in client.models.list()] == [MODEL]
    # Each key is a client: feedback is stored with the hash of the key that posted it.
    other = {"Authorization": "Bearer other-client-key"}
    done = post(url + "/v1/completions", body, headers=other).json()
    assert post(url + "/v1/feedback", {"feedback_id": "from-other", "completion_id": done["id"], "rating": 5},
                headers=other).status_code == 200
    [stored] = [r for r in stored_feedback(http, run) if r["feedback_id"] == "from-other"]
    assert stored["client"] == source_of(hashlib.sha256(b"other-client-key").hexdigest())
    # The key reached the replica as its digest, never as itself: not in the deployed app's arguments.
    from ray import serve

    details = json.dumps(serve.status().to_dict() if hasattr(serve.status(), "to_dict") else str(serve.status()))
    assert "s3cret-key" not in details


def test_the_app_refuses_to_start_without_the_key_it_was_told_to_use(run, tmp_path, monkeypatch):
    from serve.app import build

    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="serve.api_key_file=.* is empty"):
        build(load_config(run["argv"] + [f"--serve.api_key_file={empty}"]))
    with pytest.raises(ValueError, match="serve.api_key_file=.* cannot be read"):
        build(load_config(run["argv"] + [f"--serve.api_key_file={tmp_path / 'missing'}"]))
    monkeypatch.delenv("DEEPKILN_API_KEY", raising=False)
    with pytest.raises(ValueError, match="serve.host='0.0.0.0' exposes the API beyond this machine without a key"):
        build(load_config(run["argv"] + ["--serve.host=0.0.0.0"]))
    build(load_config(run["argv"] + ["--serve.host=0.0.0.0", "--serve.allow_unauthenticated=true"]))  # said so
    monkeypatch.setenv("DEEPKILN_API_KEY", "k")
    build(load_config(run["argv"] + ["--serve.host=0.0.0.0"]))  # a key from the deploying shell's environment


def test_a_crash_looping_feedback_collector_costs_feedback_never_a_completion(http, run, tmp_path):
    import os
    import signal
    import threading

    import ray

    from actors.feedback import collectors
    from deepkiln.paths import absolute

    store = f"--feedback.store={tmp_path / 'looping'}"
    url = http("--quant.format=bf16", store, "--serve.request_timeout_s=20")
    [collector] = collectors(absolute(load_config(run["argv"] + [store, "--serve.request_timeout_s=20"])))
    stop, killed = threading.Event(), []

    def killer():  # every call the collector gets, it dies: Ray restarts it, and it dies again
        while not stop.is_set():
            try:
                pid = ray.get(collector.__ray_call__.remote(lambda self: os.getpid()), timeout=5)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except Exception:
                pass

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        answers, deadline = [], time.monotonic() + 120
        while (len(answers) < 6 or len(killed) < 2) and time.monotonic() < deadline:  # through two kills at least
            answers.append(post(url + "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 4}))
    finally:
        stop.set()
        thread.join()
    assert len(killed) >= 2 and {r.status_code for r in answers} == {200}, [r.text for r in answers]


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

        def remote(self, prompts, params, n):
            self.calls.append(self.plan.pop(0))
            return self.calls[-1]

    async def messages(plan):
        ingress = OpenAIIngress.__new__(OpenAIIngress)
        ingress.llm = Handle(plan)
        got = [items async for items in ingress._generate([[1, 2]], SamplingParams(), 1)]
        return got, ingress.llm.calls

    answer = [[Started("v")], [Tokens(0, (7,)), Finished(0, "stop", last=True)]]
    got, calls = asyncio.run(messages([Stream([], True), Stream([], True), Stream(answer, False)]))
    assert got == answer and len(calls) == 3
    assert [c.cancelled for c in calls] == [True, True, False]  # a finished call needs no cancel

    async def first_message_only(plan):  # the caller leaves mid-stream (a disconnect, a timeout)
        ingress = OpenAIIngress.__new__(OpenAIIngress)
        ingress.llm = Handle(plan)
        async with contextlib.aclosing(ingress._generate([[1, 2]], SamplingParams(), 1)) as gen:
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
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=())

    async def messages():
        return [batch async for batch in generate(LLMServer(cfg.to_dict()), prompt, params)]

    got = asyncio.run(messages())
    tokens = [ids_of(batch) for batch in got]
    model, _ = load_quantized(run["report"]["formats"]["bf16"]["path"], served_dtype(run))
    assert sum(tokens, []) == Engine(model, max_batch=1).generate([prompt], params)[0].output
    assert isinstance(got[0][0], Started) and tokens[0] == [tokens[0][0]]  # the first token alone, at once
    assert got[-1][-1] == Finished(0, "length", last=True)
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
    greedy = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(EOS_ID,))
    sampled = dataclasses.replace(greedy, temperature=1.0)

    async def items(server, params, p=prompt):
        return [i for batch in [b async for b in generate(server, p, params)] for i in batch]

    async def scenario():
        server = LLMServer(cfg.to_dict())
        first, again = await items(server, greedy), await items(server, greedy)
        hits = server.info()["cache_hits"]
        await items(server, sampled), await items(server, sampled)           # unseeded: never cached
        seeded = [await items(server, dataclasses.replace(sampled, seed=3)) for _ in range(2)]
        after_sampling = server.info()["cache_hits"]
        for other in ([BOS_ID, 7], [BOS_ID, 8]):                             # evicts the greedy entry (LRU of 2)
            await items(server, greedy, other)
        evicted = await items(server, greedy)
        return first, again, hits, seeded, after_sampling, evicted, server.info()

    first, again, hits, seeded, after_sampling, evicted, info = asyncio.run(scenario())
    assert again == first and hits == 1
    assert seeded[0] == seeded[1] and after_sampling == 2
    assert evicted == first and info["cache_entries"] == 2 and info["cache_hits"] == 2


def test_a_dead_engine_process_fails_its_requests_at_once_and_the_next_request_starts_a_new_one(run):
    import asyncio
    import os
    import signal

    from deepkiln.paths import absolute
    from serve.llm import LLMServer

    cfg = absolute(load_config(run["argv"] + ["--quant.format=bf16"]))
    prompt = [BOS_ID, *run["tokenizer"].encode("The people")]
    long = SamplingParams(max_tokens=200, temperature=0)  # still decoding when the process dies
    short = dataclasses.replace(long, max_tokens=40)

    async def collect(server, params, started=None):
        items = []
        async for batch in generate(server, prompt, params):
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
        assert isinstance(items[-1], Failed) and items[-1].kind == "internal"
        assert "engine process exited" in items[-1].message and len(ids_of(items)) < 200
    assert after[-1] == Finished(0, "length", last=True) and len(ids_of(after)) == 40
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
