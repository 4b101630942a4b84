"""The pretraining ranks (`train_loop`, run by pipelines.train as Ray Train workers and by Tune trials
in their own process), the TorchTrainer that runs them, and `as_only_rank`, which runs a rank as the
only one of its process (Tune trials, online updates of one rank: deepkiln.update). Each worker is a
DeepSpeed rank built by deepkiln.training. Ray is imported inside the functions, so importing the
library stays Ray-free.

Pretraining: every train.checkpoint_every steps and at the end every rank saves its DeepSpeed state,
all pass a barrier, and only then is the checkpoint reported to Ray Train, with a consolidated
safetensors export (model/). Worker failures restart from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepkiln.config import Config
from deepkiln.evaluate import mean_loss, windows
from deepkiln.paths import RunPaths, absolute
from deepkiln.training import STATE, build_engine, is_complete, lr_at, plot_losses, seq_len_at, train_step

TAG = "deepspeed"  # DeepSpeed checkpoint tag inside every reported checkpoint


def check_inputs(cfg: Config, world: int):
    """Errors a user can cause, raised in the driver before any worker starts. Returns the windows."""
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.num_workers={world} "
                         f"x train.grad_accum={t.grad_accum}")
    data = windows(cfg)
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer's vocabulary ({data.vocab_size}, {RunPaths.of(cfg).tokens}/index.json) "
                         f"exceeds model.vocab_size={cfg.model.vocab_size}")
    if data.mixture:
        print(f"train: {data.mixture_summary(t.steps * t.batch_size)}", flush=True)
    return data


class TrainRank:
    """A rank of a Ray Train worker group: its place, the checkpoint Ray Train registered, and
    reports (with the checkpoint folder) that Ray Train persists to the run's storage."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def registered(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, folder: str, cfg: Config) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


class TrialRank:
    """The one rank of a Tune trial that trains in the trial's own process (no worker group):
    checkpoints are copied to the run's storage as Ray Train lays them out (the newest
    train.keep_checkpoints kept), where resume_checkpoint finds them after Tune retries the trial,
    and the metrics go to Tune."""
    rank, world = 0, 1

    def registered(self):
        return None  # resume_checkpoint reads the storage itself

    def report(self, metrics: dict, folder: str, cfg: Config) -> None:
        import shutil

        from ray import tune

        parent = Path(RunPaths.of(cfg).train_ray) / cfg.run.name
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".checkpoint_{metrics['step']:08d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        tmp.rename(parent / f"checkpoint_{metrics['step']:08d}")
        for old in sorted(parent.glob("checkpoint_*"))[:-cfg.train.keep_checkpoints]:
            shutil.rmtree(old)
        tune.report(metrics)


def as_only_rank(run, *args):
    """`run(*args)` as the single rank of this process: a process group of one, in memory (NCCL on
    a GPU, else gloo), with the variables DeepSpeed reads. Saves a worker group's process starts
    (Ray Train's controller and helper actors and the worker; about 10 s) where one rank is all there is."""
    import torch.distributed as dist

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("nccl" if gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return run(*args)
    finally:
        # Through DeepSpeed when it ran: it also drops its own references to the group, which a later
        # rank in this process (Ray reuses a task's worker process) would otherwise find dead.
        if "deepspeed.comm" in sys.modules and sys.modules["deepspeed.comm"].is_initialized():
            sys.modules["deepspeed.comm"].destroy_process_group()
        else:
            dist.destroy_process_group()


def train_in_process(cfg: Config) -> None:
    """pipelines.train's loop as the single rank of this process (a Tune trial of one worker, given
    the GPU Tune reserved for it where the cluster has GPUs), the run's checkpoints in its storage."""
    cfg = absolute(cfg)
    check_inputs(cfg, 1)
    as_only_rank(train_loop, cfg.to_dict(), TrialRank())


def train_loop(config: dict, rank_of: TrainRank | TrialRank | None = None) -> None:
    """One pretraining rank. Depends only on `config` (the resolved Config as a dict); `rank_of`:
    where it runs (a Ray Train worker unless told otherwise)."""
    import torch.distributed as dist
    from ray.util.metrics import Gauge
    from tensorboardX import SummaryWriter

    from deepkiln.checkpoint import save_checkpoint
    from deepkiln.faults import kill_once
    from deepkiln.flops import cached_gemm_peak, model_flops_per_token
    from deepkiln.model import Transformer
    from deepkiln.precision import describe

    cfg = Config.from_dict(config)
    t, out = cfg.train, RunPaths.of(cfg).stage("train")
    place = rank_of or TrainRank()
    rank, world = place.rank, place.world
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    data = windows(cfg)
    engine, dtype = build_engine(cfg, world)
    step, history = 0, []
    checkpoint = resume_checkpoint(cfg, place.registered())
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE).read_text())
            engine.load_checkpoint(d, tag=TAG)
            step, history = state["step"], state["history"]
    micro = t.batch_size // (world * t.grad_accum)
    writer = gauges = None
    if rank == 0:
        writer = SummaryWriter(f"{out}/tensorboard")
        gauges = {k: Gauge(f"deepkiln_train_{k}", description=f"training {k} (rank 0)", tag_keys=("run",))
                  for k in ("step", "loss", "tokens_per_s", "mfu")}
        # This host's GEMM peak in the training dtype (measured once, cached): the MFU denominator.
        peak = cached_gemm_peak(dtype) * world
        with torch.device("meta"):
            flops_per_token = model_flops_per_token(Transformer(cfg.model), t.seq_len)
    start, tokens_done = time.perf_counter(), 0
    stop = t.stop_after or t.steps
    if rank == 0:
        with open(f"{out}/progress.jsonl", "a") as f:
            f.write(json.dumps({"event": "start", "step": step, "world": world}) + "\n")
    while step < stop:
        engine.train()
        length = seq_len_at(step, t)
        lm, grad_norm, imbalance, strata = train_step(engine, data, step, cfg, rank, world)
        step += 1
        if rank == world - 1 and step == max(1, t.steps // 2):
            kill_once()  # no-op unless a kill test armed it
        tokens_done += t.batch_size * length
        loss = lm.detach().clone()
        dist.all_reduce(loss)
        grad_norm = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
        metrics = {"step": step, "loss": loss.item() / world, "lr": lr_at(step - 1, t), "seq_len": length,
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "tokens_per_s": tokens_done / (time.perf_counter() - start), "expert_imbalance": imbalance,
                   "elapsed": time.perf_counter() - start}
        if strata is not None:  # train.mixture: each stratum's mean loss over this step's rows of it
            dist.all_reduce(strata)
            metrics |= {f"loss/{s}": (total / n).item() for s, total, n in zip(data.strata, *strata) if n}
        last = step == stop
        if step % t.eval_every == 0 or last:
            metrics["val_loss"] = mean_loss(engine, data, micro, t.eval_batches)
            for s in data.strata if data.mixture else ():
                metrics[f"val_loss/{s}"] = mean_loss(engine, data, micro, t.eval_batches, s)
        if rank == 0:
            metrics["mfu"] = metrics["tokens_per_s"] * flops_per_token / peak
            for k, g in gauges.items():
                g.set(metrics[k], tags={"run": cfg.run.name})
        if rank == 0 and (step % t.log_every == 0 or last or "val_loss" in metrics):
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()),
                  flush=True)
            for k, v in metrics.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, step)
        if rank == 0:  # append-only log of every step taken, restarts included
            with open(f"{out}/progress.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        history.append(metrics)
        if step % t.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=TAG)
                if rank == 0:
                    save_checkpoint(Path(tmp) / "model", engine.module, cfg.to_dict(), step=step,
                                    tokens=sum(t.batch_size * seq_len_at(s, t) for s in range(step)))
                    plot_losses(history, os.path.join(tmp, "loss.png"))
                # Every rank's files and sizes go into the state file, so a resume can tell a
                # complete checkpoint from one that lost a rank's upload or was cut short.
                files = [None] * world
                dist.all_gather_object(files, {str(p.relative_to(tmp)): p.stat().st_size
                                               for p in Path(tmp).rglob("*") if p.is_file()})
                if rank == 0:
                    state = {"step": step, "world": world, "history": history, "precision": describe(dtype),
                             "files": {k: v for f in files for k, v in f.items()}}
                    (Path(tmp) / STATE).write_text(json.dumps(state))
                dist.barrier()  # every rank has saved before anyone reports
                place.report(metrics, tmp, cfg)
    if writer:
        writer.close()


def resume_checkpoint(cfg: Config, registered):
    """The newest complete checkpoint in this run's storage, or None for a fresh start.

    Ray Train's registered checkpoint can lag behind storage: a worker that dies soon after a
    report may leave a complete, newer folder unregistered, and restarting from the older one would
    repeat steps. So every folder is checked against its own manifest, newest first; a partial or
    corrupt one is skipped. With a registered checkpoint and nothing complete: ValueError naming it.
    """
    import pyarrow.fs as pafs
    import ray.train

    from deepkiln.corpus import resolve

    fs, parent = resolve(f"{RunPaths.of(cfg).train_ray}/{cfg.run.name}")
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    names = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_")), reverse=True)
    for path in names:
        candidate = ray.train.Checkpoint(path, filesystem=fs)
        with candidate.as_directory() as d:
            if is_complete(d):
                return candidate
        print(f"train: checkpoint {path} is incomplete or corrupt; trying an older one", flush=True)
    if registered is not None:
        raise ValueError(f"no complete checkpoint to resume from under {parent} (latest: {registered.path})")
    return None


def make_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer for a resolved config: validated inputs, absolute local paths, storage under
    the run's train folder. A run name already in storage continues unless train.resume is off."""
    from deepkiln.ray_utils import init_ray, torch_trainer

    cfg = absolute(cfg)
    t = cfg.train
    check_inputs(cfg, t.num_workers)
    init_ray()
    paths = RunPaths.of(cfg)
    os.makedirs(paths.stage("train"), exist_ok=True)
    if not t.resume and os.path.isdir(f"{paths.train_ray}/{cfg.run.name}"):
        paths.remove(f"{paths.train_ray}/{cfg.run.name}")  # reusing a run name continues it: start fresh
    return torch_trainer(train_loop, cfg.to_dict(), cfg, name=cfg.run.name, storage=paths.train_ray,
                         workers=t.num_workers, max_failures=t.max_failures, keep=t.keep_checkpoints,
                         callbacks=callbacks)
