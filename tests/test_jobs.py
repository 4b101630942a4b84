"""The cluster journey against a local `ray start --head` with token auth on, in one story: every
stage run under `ray job submit` (prepare + tokenizer in one job and Tune + train + audit + quantize
in another, each stage its own driver process; one Tune trial killed and retried from its
checkpoint), the app started with `serve run ... --non-blocking` as a job, feedback over HTTP, an
online update published while requests keep flowing (the corrected answers more likely afterwards),
a candidate trained far too hard refused by the gate, and a rollback; online runs SIGKILLed at each
step of an update, as driver processes on the head, each settled by the next, the last a KTO update
from thumbs down and corrections. And the Jobs API refusing requests without the token."""

import hashlib
import json
import random
import shlex
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
import yaml

from deepkiln.checkpoint import load_checkpoint, load_model
from deepkiln.config import load_config
from deepkiln.evaluate import continuation_logprob
from deepkiln.model import Gate
from deepkiln.paths import version_of
from deepkiln.testing import free_port, zh_paragraph
from deepkiln.tokenizer import EOS_ID, Tokenizer
from pipelines import online
from serve.api import source_of
from tests.ray_cluster import RAY_CLI, SERVE_CLI, run_driver, submit_job

pytestmark = [pytest.mark.slow]
MODEL = "deepkiln"
PROMPTS = ["The river", "A market", "The doctor wrote", "Summer in the village"]
CANARIES = ["canary.user@example.com", "555-867-5309", "4111 1111 1111 1111", "11010519491231002X"]
CORRECTIONS = ["runs past the old mill.", "opens at dawn.", "a letter to the school.", "is long and warm."]
DISLIKED = ["今天的天气", "我们的学校", "这本书", "那座城市"]  # answered in Chinese, given a thumbs down


def test_the_jobs_api_refuses_requests_without_the_token(ray_head):
    url, env, _ = ray_head
    assert requests.get(f"{url}/api/jobs/", timeout=30).status_code in (401, 403)
    token = subprocess.run([RAY_CLI, "get-auth-token"], env=env, capture_output=True, text=True).stdout.strip()
    assert requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"} | {"RAY_AUTH_TOKEN_PATH": "/nonexistent"}
    listing = subprocess.run([RAY_CLI, "job", "list", "--address", url], env=anonymous, capture_output=True, text=True)
    assert listing.returncode != 0


KEY = "journey-key"  # the app is started with a key file and limits of its own (the online jobs know neither)


def post(url, path, body, key=KEY):
    return requests.post(url + path, json=body, timeout=120, headers={"Authorization": f"Bearer {key}"} if key else {})


def app_settings_stand(url):
    """The app's own key and limits, after a publish or a rollback: no key is 401, over its
    serve.max_tokens=40 is 400."""
    assert post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 2}, key=None).status_code == 401
    over = post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 41})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens", over.text


def test_the_journey_as_jobs_with_tune_serving_an_online_update_a_refused_candidate_and_rollback(tmp_path, ray_head):
    # A small raw corpus of the user's, Chinese only, through every stage with the tiny preset's
    # tokenizer and model (the built-in English one goes through the quickstart's test).
    rng = random.Random(0)
    (tmp_path / "raw").mkdir()
    docs = [zh_paragraph(rng, 60) for _ in range(300)]
    (tmp_path / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                                         for d in docs), encoding="utf-8")
    run = ["--config", "configs/tiny.yaml", "--run.run_dir", str(tmp_path), "--train.steps=10",
           "--data.input", str(tmp_path / "raw"), "--train.eval_every=10",
           "--quant.format=bf16", "--serve.replica_cpus=0.5", "--online.min_feedback=8", "--online.steps=30",
           "--online.lr=3e-3"]
    out = tmp_path / "tiny"

    def job(*argv, **kw):
        done = submit_job(ray_head, *argv, **kw)
        assert done.returncode == 0 and "succeeded" in done.stdout.lower(), done.stdout[-3000:] + done.stderr[-3000:]
        return done

    def stages(*commands, **kw):  # one job, each stage its own driver process, as `ray job submit` runs it
        job("-c", " && ".join(shlex.join([sys.executable, "-m", f"pipelines.{n}", *run, *extra])
                              for n, *extra in commands), program="sh", **kw)

    stages(["prepare"], ["tokenizer"])
    chinese_kept(out, docs)
    marker = tmp_path / "kill-once"  # armed for the job's Ray workers: a Tune trial's worker meets it first
    stages(["tune", *TUNE], ["train"], ["audit"], ["quantize"],
           runtime_env={"env_vars": {"DEEPKILN_KILL_ONCE": str(marker)}})
    tuned(out, marker)
    assert load_checkpoint(out / "train" / "model").manifest["step"] == 10
    assert json.loads((out / "audit" / "report.json").read_text())["passed"]

    port = free_port()
    (tmp_path / "key").write_text(KEY + "\n")
    app = [*run[2:], f"--serve.api_key_file={tmp_path / 'key'}", "--serve.max_tokens=40"]
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "deepkiln", "route_prefix": "/", "import_path": "serve.app:build_app",
                                "args": {"config": "configs/tiny.yaml", "overrides": app}}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    job("run", str(tmp_path / "serve.yaml"), "--non-blocking", program=SERVE_CLI)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # --non-blocking returns once the deploy is submitted
        while not _ok(f"{url}/health"):
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(2)
        chinese_served(url, out)
        online_update(job, run, out, url, ray_head)
    finally:
        subprocess.run([SERVE_CLI, "shutdown", "-y", "--address", ray_head.url], env=ray_head.env, check=True,
                       capture_output=True)


def chinese_kept(out, docs):
    """Every document kept and counted as Chinese; the tokenizer (the tiny preset's vocabulary) keeps
    every character and gives each document back exactly."""
    report = json.loads((out / "prepare" / "prepare_report.json").read_text())
    assert report["languages"] == {"zh": 300}, report["languages"]
    index = json.loads((out / "tokenizer" / "tokens" / "index.json").read_text())
    assert index["vocab_size"] == 2048 and index["characters"]["kept_share"] == 1.0, index["characters"]
    tok = Tokenizer.load(out / "tokenizer" / "tokenizer.model")
    assert all(tok.decode(tok.encode(d)) == d for d in docs)
    chars = sorted(set("".join(docs)))
    assert [tok.decode(tok.encode(c)) for c in chars] == chars


def chinese_served(url, out):
    """The served model takes a Chinese prompt with the run's tokenizer's ids and answers."""
    tok = Tokenizer.load(out / "tokenizer" / "tokenizer.model")
    prompt = "春天的早晨，孩子们"
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode_prompt(prompt))
    assert r.json()["usage"]["completion_tokens"] > 0


# Tune: 2 ASHA trials of one worker each, both at once on 2 CPUs (one wave of process starts). One
# trial's worker is SIGKILLed once after step 4 (the marker file), before its second report: with
# tune.grace_period=2 ASHA cannot have stopped it yet, so it is retried (train.max_failures=0 fails the
# trial itself) and Tune's retry continues it from its checkpoint at step 2.
TUNE = ["--train.num_workers=1", "--train.cpus_per_worker=0.95", "--train.max_failures=0", "--train.seq_len=32",
        "--train.batch_size=16", "--tune.num_samples=2", "--tune.max_steps=8", "--tune.reports=4",
        "--tune.grace_period=2"]


def tuned(out, marker):
    """What the Tune stage left: both trials, the killed one retried from its checkpoint, best.yaml."""
    assert marker.exists()  # the kill happened (the killed worker disarmed it)
    summary = json.loads((out / "tune" / "tune_summary.json").read_text())
    assert summary["trials"] == 2 and summary["errors"] == 0
    rows = (out / "tune" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_loss" in rows[0] and "config/train.lr" in rows[0]
    assert (out / "tune" / "trials.png").stat().st_size > 1000
    starts = {}  # the retried trial: a second start, at the step-2 checkpoint, not from scratch
    for log in (out / "tune" / "trials").glob("*/train/progress.jsonl"):
        events = [json.loads(line) for line in log.read_text().splitlines()]
        starts[log.parts[-3]] = [e["step"] for e in events if e.get("event") == "start"]
    assert len(starts) == 2
    assert sorted(s for s in starts.values() if len(s) > 1) == [[0, 2]], starts
    # best.yaml is the given config with the best trial's hyperparameters, ready for pipelines.train.
    best = load_config(["--config", str(out / "tune" / "best.yaml")])
    assert best.train.lr == pytest.approx(summary["best"]["train.lr"])
    assert best.train.batch_size == summary["best"]["train.batch_size"]
    assert best.model.bias_update_rate == pytest.approx(summary["best"]["model.bias_update_rate"])
    assert best.train.steps == 10 and best.run.name == "tiny"
    assert yaml.safe_load((out / "tune" / "best.yaml").read_text())["train"]["lr"] == best.train.lr


def online_update(job, run, out, url, head):
    first = post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 8}).json()
    first_version = first["system_fingerprint"]
    # A burst of feedback: every prompt answered, then corrected three times.
    for i, prompt in enumerate(PROMPTS):
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["system_fingerprint"] == first_version
        for k in range(3):
            fb = post(url, "/v1/feedback", {"feedback_id": f"fb-{i}-{k}", "completion_id": r.json()["id"],
                                            "rating": 1, "correction": CORRECTIONS[i]})
            assert fb.status_code == 200, fb.text

    # One more, with PII canaries in the prompt, the user, the correction and the tags: trained on,
    # and stored nowhere raw (checked over every file under the run folder after the update).
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": f"Reach me at {' or '.join(CANARIES)}",
                                      "max_tokens": 8, "user": CANARIES[0]})
    assert r.status_code == 200, r.text
    assert post(url, "/v1/feedback", {"feedback_id": "fb-canary", "completion_id": r.json()["id"], "rating": 1,
                                      "correction": f"Write to {CANARIES[0]}, call {CANARIES[1]}",
                                      "tags": [CANARIES[2], CANARIES[3]]}).status_code == 200

    # Requests keep flowing while the update trains and Serve switches versions.
    statuses, fingerprints, stop = [], [], threading.Event()

    def load():  # a steady trickle (the update trains on the same 2 cores)
        while not stop.wait(0.5):
            r = post(url, "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 12})
            statuses.append(r.status_code if r.status_code == 200 else (r.status_code, r.text))
            fingerprints.append(r.json().get("system_fingerprint"))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        # Two ranks on Ray Train (half a CPU each, beside the replica); later updates are one rank in a Ray task.
        done = job("-m", "pipelines.online", *run, "--once", "--online.max_ppl_increase=1.0", "--online.num_workers=2",
                   "--train.cpus_per_worker=0.5")
    finally:
        stop.set()
        loader.join()
    assert "serving v0001" in done.stdout, done.stdout[-3000:]
    report = json.loads((out / "online" / "updates" / "update-0001.json").read_text())
    assert report["gate"]["passed"] and report["published"], report["gate"]
    assert report["feedback"] == {"examples": 13, "kind": "sft", "corrected": 13, "rated": 0, "mean_weight": 1.0,
                                  "sources": {source_of(hashlib.sha256(KEY.encode()).hexdigest()): 1.0}}
    for f in (p for p in out.rglob("*") if p.is_file()):  # no canary at rest: SQLite files, reports, versions
        data = f.read_bytes()
        assert not [c for c in CANARIES if c.encode() in data], f
    assert report["mix"] == {"feedback_per_batch": 2, "base_per_batch": 6} and report["ranks"] == 2
    assert report["loss_last"] < report["loss_first"] and report["buffer"]["unconsumed"] == 0
    assert 0 < report["feedback_to_serving_s"]
    state = json.loads((out / "online" / "state.json").read_text())
    assert state["current"] == "v0001"
    assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200]  # nothing dropped
    assert first_version in fingerprints
    new_version = post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 8}).json()
    new_version = new_version["system_fingerprint"]
    assert new_version.startswith("v0001-bf16") and new_version != first_version
    app_settings_stand(url)

    # The corrected answers became more likely, measured here on the two full-precision models.
    tok = Tokenizer.load(out / "tokenizer" / "tokenizer.model")
    old = load_model(state["versions"]["v0000"]["model"])[0].float()
    new = load_model(state["versions"]["v0001"]["model"])[0].float()
    for prompt, correction in zip(PROMPTS, CORRECTIONS):
        ids, target = tok.encode_prompt(prompt), [*tok.encode(correction), EOS_ID]
        assert continuation_logprob(new, ids, target) > continuation_logprob(old, ids, target) + 1.0
    # The update stepped the routers' balancing bias after its optimizer steps, as pretraining does
    # (the routes it counted were spent on it: the bias moved, and stays zero-mean). The MTP module
    # is not in the update's loss: its router saw no token.
    gates = [(a.bias, b.bias) for a, b in zip(old.layers.modules(), new.layers.modules()) if isinstance(a, Gate)]
    assert gates and all(not torch.equal(a, b) and abs(b.mean().item()) < 1e-6 for a, b in gates)
    assert report["gate"]["candidate"]["feedback_target_loss"] < report["gate"]["current"]["feedback_target_loss"]

    # A candidate trained far too hard fails the gate: kept, not published, the report says why.
    for i, prompt in enumerate(PROMPTS * 2):
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert post(url, "/v1/feedback", {"feedback_id": f"fb2-{i}", "completion_id": r.json()["id"],
                                          "rating": 2, "correction": "nonsense " * 3}).status_code == 200
    # It is SIGKILLed just after the state recorded it, before its examples were consumed.
    state = killed_at(head, run, out, url, "recorded", "--online.method=full", "--online.lr=1.0", "--online.steps=4")
    bad = state["versions"]["v0002"]
    assert not bad["gate"]["passed"] and not bad["published"] and state["current"] == "v0001"
    assert any("held-out perplexity" in reason for reason in bad["gate"]["reasons"]) and waiting(out) == 8
    assert post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 8}).json()[
        "system_fingerprint"] == new_version

    # Rollback: one command, and the first version answers again. This one is SIGKILLed just after
    # Serve switched, before its state says so; the next run settles the state with what Serve serves.
    marker = out.parent / "kill-rollback"
    killed = run_driver(head, "-m", "pipelines.online", *run, "--rollback", env_vars={
        "DEEPKILN_KILL_ONCE": str(marker), "DEEPKILN_KILL_AT": "switched"})
    assert marker.exists() and killed.returncode != 0, killed.stdout[-3000:]
    state = json.loads((out / "online" / "state.json").read_text())
    assert state["publishing"] == "v0000" and state["current"] == "v0001"
    assert post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 8}).json()[
        "system_fingerprint"] == first_version
    # Then updates killed at their other steps, each run settling what the one before left.
    (out / "online" / "versions" / "v0003" / "model").mkdir(parents=True)  # what a run killed after
    (out / "online" / "versions" / "v0003" / "model" / "partial").write_text("x")  # training leaves
    quick = ["--online.steps=2", "--online.max_ppl_increase=1.0", "--online.preference_pairs=8", "--train.eval_batches=1"]
    state = killed_at(head, run, out, url, "consumed", *quick)  # it first settled the rollback
    assert state["current"] == "v0000" and state["history"][-2:] == ["v0001", "v0000"] and state["updates"] == 3
    assert waiting(out) == 0 and not (out / "online" / "versions" / "v0003" / "model" / "partial").exists()
    # This one learns with KTO from thumbs down on one kind of answer and corrections of another (the
    # labels every earlier record left wait too): published, and the disliked answers less likely.
    correct(url, "fb4")
    disliked = []
    for i, prompt in enumerate(DISLIKED):
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
        disliked.append((prompt, r.json()["choices"][0]["text"]))
        assert post(url, "/v1/feedback", {"feedback_id": f"down-{i}", "completion_id": r.json()["id"],
                                          "rating": "down"}).status_code == 200
    state = killed_at(head, run, out, url, "published", *quick, "--online.method=kto", "--online.steps=20",
                      "--online.feedback_fraction=0.5")  # Serve switched and the state says so
    assert state["updates"] == 4 and state["current"] == state["history"][-1] == "v0004"
    assert waiting(out) == 8 and waiting(out, "label") == 0  # KTO consumed the labels; the SFT examples wait
    verdict = state["versions"]["v0004"]["gate"]
    assert verdict["passed"] and verdict["candidate"]["disfavoured_loss"] > verdict["current"]["disfavoured_loss"]
    parent = load_model(state["versions"][state["versions"]["v0004"]["parent"]]["model"])[0].float()
    kto = load_model(state["versions"]["v0004"]["model"])[0].float()
    for prompt, answer in disliked:
        ids, target = tok.encode_prompt(prompt), [*tok.encode(answer), EOS_ID]
        assert continuation_logprob(kto, ids, target) < continuation_logprob(parent, ids, target) - 0.5, prompt
    app_settings_stand(url)
    with pytest.raises(ValueError, match="--rollback v0002: not a kept version that passed the gate"):
        online.main([*run, "--rollback", "v0002"])  # refused before it needs the cluster


def waiting(out, kind: str = "sft") -> int:
    """Examples (or pairs or labels) in the replay buffer (consumed ones are deleted)."""
    with sqlite3.connect(out / "online" / "replay.sqlite") as db:
        if kind == "sft":
            return db.execute("SELECT count(*) FROM examples").fetchone()[0]
        return db.execute("SELECT count(*) FROM preferences WHERE kind = ?", (kind,)).fetchone()[0]


def correct(url, tag):
    for i, prompt in enumerate(PROMPTS * 2):
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert post(url, "/v1/feedback", {"feedback_id": f"{tag}-{i}", "completion_id": r.json()["id"],
                                          "rating": 1, "correction": CORRECTIONS[i % 4]}).status_code == 200


def killed_at(head, run, out, url, step, *options):
    """`pipelines.online --once` SIGKILLed at `step` of its update; then: no publish left under way
    in the state, nothing it names missing, and Serve serving the version it says is current."""
    marker = out.parent / f"kill-{step}"
    done = run_driver(head, "-m", "pipelines.online", *run, "--once", *options, env_vars={
        "DEEPKILN_KILL_ONCE": str(marker), "DEEPKILN_KILL_AT": step})
    assert marker.exists() and done.returncode != 0, (step, done.stdout[-3000:])
    state = json.loads((out / "online" / "state.json").read_text())
    assert "publishing" not in state, step
    for name, v in state["versions"].items():
        assert v.get("pruned") or load_checkpoint(v["artifact"]), (step, name)  # whole, checksums and all
    served = post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 2}).json()
    assert served["system_fingerprint"] == version_of(state["versions"][state["current"]]["artifact"]), step
    assert not (out / "online" / "updates" / f"update-{state['updates']:04d}.json").exists()  # killed before it
    return state


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=10).status_code == 200
    except requests.ConnectionError:
        return False
