"""Helpers for tests that talk to a `ray start --head` cluster (the ray_head fixture)."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")
SERVE_CLI = str(Path(sys.executable).parent / "serve")


class Head(NamedTuple):
    """A running head: its dashboard URL (the Jobs API), the environment for the `ray` CLI (it holds
    the auth token) and the GCS address a driver on the head connects to."""
    url: str
    env: dict
    address: str


def submit_job(head: Head, *argv: str, runtime_env: dict | None = None, timeout: float = 900,
               program: str = sys.executable):
    """`ray job submit --working-dir <repo> -- <program> <argv>` against `head` (program: this
    Python, or a CLI such as SERVE_CLI); waits for the result. Retries while the head's job agent is
    still starting. Returns the CompletedProcess."""
    cmd = [RAY_CLI, "job", "submit", "--address", head.url, "--working-dir", str(REPO)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--", program, *argv]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent comes up a little after its HTTP server
        job = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)


def run_driver(head: Head, *argv: str, env_vars: dict | None = None, timeout: float = 900):
    """`python <argv>` as a driver process on the head, as a job's entrypoint runs (without the Jobs
    API's supervisor around it: a test that SIGKILLs the driver needs no job record). Returns the
    CompletedProcess."""
    env = head.env | {"RAY_ADDRESS": head.address} | (env_vars or {})
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
