"""Session fixtures: each artifact the suite needs is built once (a local Ray, the built-in corpus's
token shards, a small trained and quantized run) and copied for tests that write into it. Tests that
need a Ray cluster of their own (a `ray start --head` with token auth, a quickstart's own local Ray)
run last, after the session's Ray is shut down: one cluster is alive at a time.

Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) every test that needs a Ray cluster is in
one group, "ray", which one worker runs in the order above; the Ray-free tests run beside it on the
other worker with one torch thread each, in the cores the Ray tests leave idle while processes start
and requests wait."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from deepkiln.ray_utils import LOCAL_ENV
from deepkiln.testing import free_port
from tests.ray_cluster import RAY_CLI, Head

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
LAST = ("own_ray", "ray_head")  # fixtures of tests that run with a Ray of their own, in this order
NICE = 19  # the Ray-free worker's niceness under pytest-xdist: the CPU it gets is what the Ray tests leave
RAY = ("ray_local", *LAST)  # a test that uses one of these (directly or through another fixture) needs Ray


def needs_ray(item) -> bool:
    return any(f in RAY for f in getattr(item, "fixturenames", ()))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Tests with a cluster of their own go last, the `ray start --head` ones at the very end (a
    stable sort: the order is otherwise the files'); every test that needs Ray joins the "ray" group."""
    def rank(item) -> int:
        names = getattr(item, "fixturenames", ())
        return max((i + 1 for i, f in enumerate(LAST) if f in names), default=0)

    items.sort(key=rank)
    for item in items:
        if needs_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Under pytest-xdist, before the test's fixtures are built (a session fixture's build is the
    heaviest part of some tests): the Ray tests must be grouped, and a Ray-free test's worker yields
    to the Ray worker: one torch thread, niced, so it takes only the CPU the Ray tests leave idle."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    if needs_ray(item):  # ungrouped, Ray tests would run on both workers: two clusters on two cores
        assert item.nodeid.endswith("@ray"), (
            "Under pytest-xdist the Ray tests need `--dist loadgroup` (as `make test` runs it) and a pytest "
            "whose node ids xdist can group (below 9.2, see pytest-xdist#1386)")
    else:
        torch.set_num_threads(1)
        os.setpriority(os.PRIO_PROCESS, 0, max(NICE, os.getpriority(os.PRIO_PROCESS, 0)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_stray_ray(request):
    """Under pytest-xdist, a Ray-free test that started Ray (e.g. an actor call without the ray_local
    fixture) would run a second cluster beside the Ray worker's: a test that needs Ray must say so."""
    beside_ray = "PYTEST_XDIST_WORKER" in os.environ and not needs_ray(request.node)
    had_ray = _ray_up()
    yield
    assert not beside_ray or had_ray or not _ray_up(), f"{request.node.nodeid} started Ray: give it ray_local"


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture
def one_thread():
    """One torch thread for the test: two OpenMP threads on a busy 2-core machine ran many times slower."""
    with torch_threads(1):
        yield


# The torch threads a shared artifact is built with, whichever worker builds it: its weights depend on
# the thread count (the order of reductions), and the thresholds of the tests that read it were set on
# builds of two threads (these 2-core machines' default).
BUILD_THREADS = 2


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shutdown_session_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for every test that needs it (2 CPUs, no dashboard, its own temp dir), with the
    settings init_ray gives a local Ray. Yields the fault-injection marker: it exists (disarmed); a
    test deletes it to arm one SIGKILL."""
    import ray

    marker = tmp_path_factory.mktemp("fault") / "kill-once"
    marker.touch()
    os.environ["DEEPKILN_KILL_ONCE"] = str(marker)  # inherited by Ray's worker processes
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    # Metrics exported every 2 s, not 10: the Prometheus test waits for them.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"), _system_config={"metrics_report_interval_ms": 2000})
    yield marker
    _shutdown_session_ray()


@pytest.fixture
def own_ray():
    """For a test that starts its own local Ray (a quickstart): the session's is shut down first (the
    test runs after every test that needs it), and whatever Ray the test started is shut down after."""
    _shutdown_session_ray()
    yield
    _shutdown_session_ray()


@pytest.fixture(scope="session")
def builtin_run(ray_local, tmp_path_factory):
    """The built-in corpus through prepare and the tokenizer with the tiny preset (vocabulary 2048),
    once: (run folder, argv pointing at it, prepare report, tokenizer index)."""
    from pipelines import prepare, tokenizer

    root = tmp_path_factory.mktemp("builtin")
    argv = ["--config", TINY, "--run.run_dir", str(root), "--run.name", "data", "--tokenizer.sample_docs=3000"]
    report = prepare.main(argv)
    index = tokenizer.main(argv)
    return {"root": root / "data", "argv": argv, "prepare": report, "index": index,
            "tokens": root / "data" / "tokenizer" / "tokens"}


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """deepkiln.testing.make_run (a tokenizer and the tiny model trained briefly on made-up English)
    quantized to bf16, int8 and nf4 by pipelines.quantize, once per session: under pytest-xdist the
    first worker to need it builds it in the session's shared temp folder while the other waits on
    a file lock. Read-only: tests that write into a run take `served_copy`."""
    from filelock import FileLock

    from deepkiln.tokenizer import Tokenizer
    from deepkiln.testing import make_run, run_args
    from pipelines import quantize

    if "PYTEST_XDIST_WORKER" in os.environ:  # <basetemp>/popen-gwN: its parent is this session's
        root = tmp_path_factory.getbasetemp().parent / "served"
    else:
        root = tmp_path_factory.mktemp("served")
    argv, done = run_args(root, "served"), root / "quantize_report.json"
    with FileLock(f"{root}.lock"), torch_threads(BUILD_THREADS):
        if not done.is_file():
            root.mkdir(exist_ok=True)
            make_run(root)
            done.write_text(json.dumps(quantize.main(argv)))
    return {"root": root, "argv": argv, "report": json.loads(done.read_text()),
            "tokenizer": Tokenizer.load(root / "served" / "tokenizer" / "tokenizer.model")}


@pytest.fixture
def served_copy(served_run, tmp_path):
    """(folder, argv) of a private copy of the served run, for a test that writes into it."""
    from deepkiln.testing import copy_run

    return tmp_path, copy_run(served_run["argv"], tmp_path)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A `ray start --head` cluster with token auth on (2 CPUs, dashboard and job server on
    127.0.0.1), started after the session's local Ray is shut down (one cluster at a time). Every
    port is picked free. Yields a tests.ray_cluster.Head. Ended by pid."""
    _shutdown_session_ray()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"} | LOCAL_ENV
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
        # Its processes find their own cluster through RAY_ADDRESS, as on a real node.
        env=env | {"RAY_ADDRESS": f"127.0.0.1:{gcs}"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: ended whole, by its pid
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY_CLI, "job", "list", "--address", url], env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and head.poll() is None, log_path.read_text()
            time.sleep(2)
        yield Head(url, env, f"127.0.0.1:{gcs}")
    finally:
        # The whole process group at once: on SIGTERM `ray start --block` stops the cluster's
        # processes one kind after another, a second or more each; its workers exit with their raylet.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        log.close()
