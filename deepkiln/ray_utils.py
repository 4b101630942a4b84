"""The one place the library touches Ray: connecting a job's driver."""

from __future__ import annotations

import logging
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
        for key, value in LOCAL_ENV.items():  # read by the processes this Ray starts
            os.environ.setdefault(key, value)
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")


# A Ray started on this machine: no spot preemption to watch for (the watcher's actor also logs an
# internal error line at every start), and Ray Train's controller polls its workers every 0.2 s
# instead of 2 s (a short run ended up to 2 s after its last step, and started slower).
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def torch_trainer(loop, loop_config: dict, cfg, *, name: str, storage: str, workers: int, max_failures: int,
                  keep: int | None = None, callbacks: list | None = None):
    """A TorchTrainer running `loop(loop_config)` on `workers` DeepSpeed ranks: GPUs and NCCL when
    the cluster has GPUs (a job's driver on a CPU head counts its GPU workers), else gloo on
    train.cpus_per_worker CPUs each; storage `storage`/`name`."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = uses_gpu()
    env = rank_env(use_gpu)
    return TorchTrainer(
        _quietly(loop), train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=callbacks,
                             # Ray Train's INFO lines (worker group started, each checkpoint reported)
                             # stay in its log files; the console keeps the run's own progress.
                             logging_config=LoggingConfig(log_level="WARNING"),
                             worker_runtime_env={"env_vars": env}))


def one_rank(fn, *args, cfg, max_retries: int = 1):
    """`fn(*args)` as the only rank of a process group of one, in a Ray task that holds what one
    TorchTrainer worker would (train.cpus_per_worker CPUs, a GPU where the cluster has GPUs, the
    same environment); returns its result. Ray runs it again once if its process dies."""
    use_gpu = uses_gpu()
    task = ray.remote(_only_rank).options(num_cpus=cfg.train.cpus_per_worker, num_gpus=int(use_gpu),
                                          max_retries=max_retries, runtime_env={"env_vars": rank_env(use_gpu)})
    return ray.get(task.remote(fn, *args))


def _only_rank(fn, *args):
    from deepkiln.trainer import as_only_rank

    return as_only_rank(fn, *args)


def uses_gpu() -> bool:
    """Whether ranks run on GPUs: this process has one, or the cluster (a job's driver on a CPU head
    counts its GPU workers)."""
    import torch

    return torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) >= 1


def rank_env(use_gpu: bool) -> dict[str, str]:
    """A rank's environment variables. On CPU DeepSpeed is told so (else each rank warns it found no
    accelerator)."""
    return compute_env() | ({} if use_gpu else {"DS_ACCELERATOR": "cpu"})


def _quietly(loop):
    """`loop` with Ray Train's per-report INFO line ("Reporting training result N: ...", logged by
    every rank to a logger named after its source file, which LoggingConfig does not reach) kept
    off the console, like its other INFO lines."""
    def run(config):
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
        return loop(config)

    run.__name__ = getattr(loop, "__name__", "loop")
    return run


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
    GLIBC_TUNABLES wins. Ray Train's print patch is off: it sent every line of a worker's print
    both to stdout and to a logger that prints it again."""
    return {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


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
