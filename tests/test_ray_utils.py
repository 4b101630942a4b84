import json
import os
import subprocess
import sys

import pytest

from deepkiln.ray_utils import compute_env

# Allocates and frees a 64 MiB tensor a few times from a non-main thread (where Ray Train runs the
# training function) and prints the minor page faults each round took.
ROUNDS = """
import json, resource, threading, torch
faults = []
def rounds():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20).sum()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=rounds)
t.start()
t.join()
print(json.dumps(faults))
"""


def faults_per_round(env: dict) -> list[int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tunables")
def test_compute_env_keeps_freed_activations_mapped():
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    default = faults_per_round(base)
    tuned = faults_per_round({**base, **compute_env()})
    # glibc's defaults give the tensor back to the OS and fault all of it in again every round.
    # With the tunables the heap grows for a few rounds (aligned blocks do not fit the exact hole a
    # freed one leaves) and then serves every round from memory it kept.
    assert min(default[-4:]) > pages // 2, default
    assert sum(tuned[-4:]) < pages // 20, tuned


def test_compute_env_leaves_a_users_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert compute_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
