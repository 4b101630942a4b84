"""The one place the library touches Ray: connecting a job's driver."""

from __future__ import annotations

import os
import signal
import threading
import warnings

import ray


def init_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS, set by `ray job submit`), else start
    a local Ray for this process. A no-op when Ray is already initialised (tests, notebooks).
    The local one starts its dashboard on 127.0.0.1: Ray's state API lives there, and Ray Train's
    placement-group cleaner (which frees the workers of a stopped Tune trial) needs it."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


def fit(trainer):
    """`trainer.fit()`, then the SIGINT handler there was before. Ray Train installs its own for
    the run (Ctrl-C aborts training) and leaves it behind, so a driver that goes on afterwards
    (the quickstart serving, the online loop) would swallow every later Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():  # Ray Train installs none there
        return trainer.fit()
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, before)


# glibc malloc, as PyTorch's caching allocators do on GPU: keep freed memory for the next step instead
# of returning it to the OS. By default each step's activations are mmapped and unmapped again, and
# re-faulting them cost the small preset 1.4M page faults and ~20% of its CPU step time; the Ray Train
# thread also gets a non-main arena, which can't reuse a heap that large. One arena, no trimming.
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"


def compute_env() -> dict[str, str]:
    """Environment variables for processes that run the model's steps (Ray Train workers, the
    benchmark baseline). Read when a process starts, so they go in its runtime_env. A user's own
    GLIBC_TUNABLES wins."""
    return {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES)}


def cpus_per_actor(wanted: float, actors: int, field: str) -> float:
    """CPUs to reserve per actor so that `actors` of them fit in the cluster at once: Ray actors
    hold their CPUs for life, so asking for more than exist would leave some never scheduled."""
    total = ray.cluster_resources().get("CPU", 1.0)
    if wanted * actors <= total:
        return wanted
    fitted = total / actors
    warnings.warn(f"{field}={wanted} x {actors} actors exceeds the cluster's {total:g} CPUs; "
                  f"using {fitted:.3g} CPUs each", stacklevel=2)
    return fitted
