"""The quickstart: every stage in order on the built-in corpus to a live endpoint and a summary; a
run killed half-way finishes when run again, reusing the stages it had finished."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from pipelines import quickstart
from deepkiln.testing import free_port
from tests.ray_cluster import REPO

FAST = ["--config", "configs/tiny.yaml", "--train.steps=10", "--train.eval_every=10", "--online.steps=4",
        "--serve.replica_cpus=0.5"]


def test_a_stage_is_done_only_when_its_last_file_is_there(tmp_path):
    cfg = quickstart.load_config(["--config", "configs/tiny.yaml", "--run.run_dir", str(tmp_path)])
    assert quickstart.done_marker(cfg, "train") == tmp_path / "tiny" / "train" / "train_summary.json"
    assert quickstart.done_marker(cfg, "feedback") == quickstart.done_marker(cfg, "online")
    assert quickstart.done_marker(cfg, "serve") is None  # always started anew


def console_lines(text: str):
    """The console's lines as a reader sees them: without colour codes, Ray's "(Worker pid=N)"
    prefix and its "[repeated Nx across cluster]" note; blank and ==== rule lines left out."""
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        line = re.sub(r"^\(\S+ pid=\d+(, ip=\S+)?\) ", "", line)
        line = re.sub(r" \[repeated \d+x across cluster\].*$", "", line).rstrip()
        if line and set(line) != {"="}:
            yield line


@pytest.mark.slow
@pytest.mark.usefixtures("own_ray")  # the quickstart starts its own local Ray, as `make run` does
def test_killed_during_training_then_run_again_to_a_live_endpoint(tmp_path, capfd):
    from ray import serve

    argv = FAST + ["--run.run_dir", str(tmp_path), "--serve.port", str(free_port())]
    # First run, in its own process group (its driver and the local Ray it starts): killed mid-training.
    first = subprocess.Popen([sys.executable, "-m", "pipelines.quickstart", *argv], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if "[3/8] train" in line:
            time.sleep(4)  # inside the train stage
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert any("[1/8] prepare" in line for line in seen), "".join(seen[-20:])
    assert not (tmp_path / "tiny" / "train" / "train_summary.json").exists()

    try:
        capfd.readouterr()
        result = quickstart.main(argv)
        console = capfd.readouterr()
        # What a newcomer reads: every line once (library warnings included), whichever process
        # printed it (Ray prefixes a worker's lines with its name and pid).
        lines = list(console_lines(console.out + console.err))
        assert "[3/8] train ..." in lines and any(line.startswith("online: update 1:") for line in lines)
        repeated = {line: n for line, n in collections.Counter(lines).items() if n > 1}
        assert not repeated, repeated
        assert not [line for line in lines if "ERROR" in line or "Traceback" in line], lines
        out = result["summary"]
        assert out["data kept"].endswith("near duplicates removed)") and out["audit"] == "passed"
        assert out["languages"].startswith("en ")  # Python's documentation
        assert "prepare" not in result["times"] and "train" in result["times"]  # reused, and redone
        assert out["online"].startswith("1 update(s)") and result["url"] in out["endpoint"]
        update = json.loads((tmp_path / "tiny" / "online" / "updates" / "update-0001.json").read_text())
        assert update["ranks"] == 1  # one rank, trained in a Ray task
        r = requests.post(f"{result['url']}/v1/completions", timeout=60,
                          json={"model": "deepkiln", "prompt": "The for statement", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        assert result["sample"].startswith("The for statement")
        # The built-in corpus is bilingual (Tang poems beside Python's docs): a Chinese prompt is answered.
        assert re.search(r"(^|, )zh \d", out["languages"]), out["languages"]
        assert result["sample_zh"].startswith(quickstart.SAMPLES["sample (zh)"])
        assert out["sample (zh)"] and len(result["sample_zh"]) > len(quickstart.SAMPLES["sample (zh)"])

        again = quickstart.main(argv)  # everything reused but the endpoint
        assert set(again["times"]) == {"serve"} and again["summary"]["online"] == out["online"]
    finally:
        serve.shutdown()
