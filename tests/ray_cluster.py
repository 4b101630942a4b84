"""Helpers for tests that talk to a `ray start --head` cluster (the ray_head fixture)."""

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")
SERVE_CLI = str(Path(sys.executable).parent / "serve")


def submit_job(head, *argv: str, runtime_env: dict | None = None, timeout: float = 900, program: str = sys.executable):
    """`ray job submit --working-dir <repo> -- <program> <argv>` against `head` (program: this
    Python, or a CLI such as SERVE_CLI); waits for the result. Retries while the head's job agent is
    still starting. Returns the CompletedProcess."""
    url, env = head
    cmd = [RAY_CLI, "job", "submit", "--address", url, "--working-dir", str(REPO)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--", program, *argv]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent comes up a little after its HTTP server
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)
