import os
import subprocess
import tempfile
import time

import pytest
import torch

from tests.ray_cluster import RAY_CLI, free_port


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: two OpenMP threads on a busy 2-core machine ran many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for every test that needs it (2 CPUs, no dashboard, its own temp dir).
    Yields the fault-injection marker: it exists (disarmed); a test deletes it to arm one SIGKILL."""
    import ray

    marker = tmp_path_factory.mktemp("fault") / "kill-once"
    marker.touch()
    os.environ["DEEPKILN_KILL_ONCE"] = str(marker)  # inherited by Ray's worker processes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield marker
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A `ray start --head` cluster with token auth on (2 CPUs, dashboard and job server on
    127.0.0.1), beside the in-process one: every port picked free so the two never collide.
    Yields (dashboard URL, environment for the `ray` CLI holding the token). Ended by pid."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    subprocess.run([RAY_CLI, "get-auth-token", "--generate"], env=env, capture_output=True, check=False)
    dashboard, gcs = free_port(), free_port()
    url = f"http://127.0.0.1:{dashboard}"
    log_path = tmp_path_factory.mktemp("head") / "head.log"
    log = open(log_path, "w")
    head = subprocess.Popen(  # --block: the head lives as long as this process, which we end by pid
        [RAY_CLI, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}",
         "--disable-usage-stats", f"--temp-dir={tempfile.mkdtemp(prefix='rayhead-', dir='/tmp')}"],
        # Its processes find their own cluster through RAY_ADDRESS, as on a real node: without it the
        # state API inside Ray's actors sees two clusters on this machine and refuses to pick one.
        env=env | {"RAY_ADDRESS": f"127.0.0.1:{gcs}"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY_CLI, "job", "list", "--address", url], env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and head.poll() is None, log_path.read_text()
            time.sleep(2)
        yield url, env
    finally:
        head.terminate()
        head.wait(timeout=120)
        log.close()

