"""The one place the library touches Ray: connecting a job's driver."""

from __future__ import annotations

import os
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
