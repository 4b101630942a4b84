"""The cluster workflow against a local `ray start --head` with token auth on: every stage submitted
with `ray job submit`, the app started with `serve run ... --non-blocking` as a job, the endpoint
answering over HTTP, one online update published; and the Jobs API refusing requests without the token."""

import json
import random
import subprocess
import time

import pytest
import requests
import yaml

from deepkiln.checkpoint import load_checkpoint
from deepkiln.testing import free_port, paragraph
from tests.ray_cluster import RAY_CLI, SERVE_CLI, submit_job

pytestmark = [pytest.mark.slow]


def test_the_jobs_api_refuses_requests_without_the_token(ray_head):
    url, env = ray_head
    assert requests.get(f"{url}/api/jobs/", timeout=30).status_code in (401, 403)
    token = subprocess.run([RAY_CLI, "get-auth-token"], env=env, capture_output=True, text=True).stdout.strip()
    assert requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"} | {"RAY_AUTH_TOKEN_PATH": "/nonexistent"}
    listing = subprocess.run([RAY_CLI, "job", "list", "--address", url], env=anonymous, capture_output=True, text=True)
    assert listing.returncode != 0


def test_every_stage_as_a_job_then_serve_run_then_an_online_update(tmp_path, ray_head):
    # A small raw corpus of the user's (the built-in one goes through the quickstart's test).
    rng = random.Random(0)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": paragraph(rng, 60)}) + "\n"
                                                         for _ in range(300)))
    run = ["--config", "configs/tiny.yaml", "--run.run_dir", str(tmp_path), "--train.steps=10",
           "--data.input", str(tmp_path / "raw"), "--tokenizer.vocab_size=512",
           "--train.eval_every=10", "--quant.format=bf16", "--serve.replica_cpus=0.5", "--online.min_feedback=4",
           "--online.steps=4"]

    def job(*argv, **kw):
        done = submit_job(ray_head, *argv, **kw)
        assert done.returncode == 0 and "succeeded" in done.stdout.lower(), done.stdout[-3000:] + done.stderr[-3000:]
        return done

    for stage in ("prepare", "tokenizer", "train", "audit", "quantize"):
        job("-m", f"pipelines.{stage}", *run)
    out = tmp_path / "tiny"
    assert load_checkpoint(out / "train" / "model").manifest["step"] == 10
    assert json.loads((out / "audit" / "report.json").read_text())["passed"]

    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "deepkiln", "route_prefix": "/", "import_path": "serve.app:build_app",
                                "args": {"config": "configs/tiny.yaml", "overrides": run[2:]}}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    job("run", str(tmp_path / "serve.yaml"), "--non-blocking", program=SERVE_CLI)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # --non-blocking returns once the deploy is submitted
        while not _ok(f"{url}/health"):
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(2)
        answers = []
        for i in range(4):
            r = requests.post(f"{url}/v1/completions", timeout=120,
                              json={"model": "deepkiln", "prompt": f"The for statement {i}", "max_tokens": 8})
            assert r.status_code == 200, r.text
            answers.append(r.json())
            assert requests.post(f"{url}/v1/feedback", timeout=60, json={
                "feedback_id": f"job-{i}", "completion_id": r.json()["id"], "rating": 1,
                "correction": "iterates over the items of a sequence."}).status_code == 200
        done = job("-m", "pipelines.online", *run, "--once", "--online.max_ppl_increase=1.0")
        assert "serving v0001" in done.stdout, done.stdout[-3000:]
        r = requests.post(f"{url}/v1/completions", timeout=120,
                          json={"model": "deepkiln", "prompt": "The for statement", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["system_fingerprint"] != answers[0]["system_fingerprint"]
        assert r.json()["system_fingerprint"].startswith("v0001-bf16")
    finally:
        job("shutdown", "-y", program=SERVE_CLI)


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=10).status_code == 200
    except requests.ConnectionError:
        return False
