"""Train: Ray Train TorchTrainer whose workers are DeepSpeed ranks (pretraining and fine-tuning).

    python -m pipelines.train --config configs/tiny.yaml [--train.steps=300 --train.zero_stage=2]
    ray job submit --working-dir . -- python -m pipelines.train --config configs/small.yaml

Reads the tokenizer stage's token shards (<run_dir>/<run.name>/tokenizer/tokens/, or train.tokens).
Each rank builds the model and calls deepspeed.initialize (ZeRO 0-3, bf16, gradient accumulation,
clipping, AdamW with warmup + cosine); gloo on CPU, NCCL on GPU. Every train.checkpoint_every steps
and at the end every rank saves its DeepSpeed state, all pass a barrier, and only then is the
checkpoint reported to Ray Train, together with a consolidated safetensors export (model/). Worker
failures restart from the last reported checkpoint (train.max_failures); `--train.resume=true`
continues the run of the same name on purpose. Rank 0 writes TensorBoard events, loss.png and a
progress line per log step. The final model is exported to <run_dir>/<run.name>/train/model/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepkiln.config import Config, TrainArgs, load_config, stage_dir
from deepkiln.data import TokenWindows

TAG = "deepspeed"            # DeepSpeed checkpoint tag inside every reported checkpoint
STATE = "train_state.json"   # step, samples, world size: written by rank 0 after the barrier


def lr_at(step: int, t: TrainArgs) -> float:
    """Linear warmup to t.lr, then cosine down to t.lr * t.min_lr_ratio at t.steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def seq_len_at(step: int, t: TrainArgs) -> int:
    """The curriculum's sequence length for `step`: seq_len_start growing linearly to seq_len over
    curriculum_steps, in multiples of 8; seq_len when the curriculum is off."""
    if not t.seq_len_start or step >= t.curriculum_steps:
        return t.seq_len
    grown = t.seq_len_start + (t.seq_len - t.seq_len_start) * step / t.curriculum_steps
    return min(t.seq_len, max(8, int(grown) // 8 * 8))


def tokens_dir(cfg: Config) -> str:
    return cfg.train.tokens or f"{stage_dir(cfg, 'tokenizer')}/tokens"


def deepspeed_config(cfg: Config, world: int, dtype: torch.dtype) -> dict:
    t = cfg.train
    zero = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (world * t.grad_accum),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        # Offloaded state is stepped by our torch AdamW (fused), not DeepSpeed's compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }


def check_inputs(cfg: Config, world: int) -> TokenWindows:
    """Errors a user can cause, raised in the driver before any worker starts."""
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.num_workers={world} "
                         f"x train.grad_accum={t.grad_accum}")
    data = TokenWindows(tokens_dir(cfg), t.seq_len, t.val_fraction, cfg.run.seed)
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer's vocabulary ({data.vocab_size}, {tokens_dir(cfg)}/index.json) "
                         f"exceeds model.vocab_size={cfg.model.vocab_size}")
    return data


def _tensorboard(path: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(path)


def plot_losses(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train")
    val = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_engine(cfg: Config, world: int):
    """One rank's DeepSpeed engine over a fresh model, and the compute dtype it trains in (decided
    here, on the rank's own device: a CPU driver says nothing of a GPU worker)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from deepkiln.model import MoE, Transformer
    from deepkiln.precision import compute_dtype

    t = cfg.train
    dtype = compute_dtype(t.dtype)
    torch.manual_seed(cfg.run.seed)  # same init on every rank
    model = Transformer(cfg.model)
    model.checkpoint_blocks = t.activation_checkpointing
    if t.zero_stage == 3:
        set_z3_leaf_modules(model, [MoE])  # experts run in data-dependent order: gather MoE whole
    # fused: one pass over each parameter tensor (several times faster than the default on CPU).
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, t) / t.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, world, dtype))
    return engine, dtype


def train_loop(config: dict) -> None:
    """One DeepSpeed rank. Depends only on `config` (the resolved Config as a dict)."""
    import ray.train
    import torch.distributed as dist

    from ray.util.metrics import Gauge

    from deepkiln.checkpoint import save_checkpoint
    from deepkiln.faults import kill_once
    from deepkiln.flops import cached_gemm_peak, model_flops_per_token
    from deepkiln.model import Gate, Transformer
    from deepkiln.precision import describe

    cfg = Config.from_dict(config)
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    data = TokenWindows(tokens_dir(cfg), t.seq_len, t.val_fraction, cfg.run.seed)
    engine, dtype = build_engine(cfg, world)

    gates = [m for m in engine.module.modules() if isinstance(m, Gate)]
    # DeepSpeed keeps the global gradient norm for bf16 and ZeRO optimizers only; fp32 at ZeRO-0 has
    # whole gradients on every rank, so the loop measures it itself.
    own_norm, grad_norm = t.zero_stage == 0 and not engine.bfloat16_enabled(), None
    step, history = 0, []
    checkpoint = resume_checkpoint(cfg, ray.train.get_checkpoint())
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE).read_text())
            engine.load_checkpoint(d, tag=TAG)
            step, history = state["step"], state["history"]
    micro = t.batch_size // (world * t.grad_accum)
    writer = gauges = None
    if rank == 0:
        writer = _tensorboard(f"{stage_dir(cfg, 'train')}/tensorboard")
        gauges = {k: Gauge(f"deepkiln_train_{k}", description=f"training {k} (rank 0)", tag_keys=("run",))
                  for k in ("step", "loss", "tokens_per_s", "mfu")}
        # This host's GEMM peak in the training dtype (measured once, cached): the MFU denominator.
        peak = cached_gemm_peak(dtype) * world
        with torch.device("meta"):
            flops_per_token = model_flops_per_token(Transformer(cfg.model), t.seq_len)
    start, tokens_done = time.perf_counter(), 0
    stop = t.stop_after or t.steps
    if rank == 0:
        with open(f"{stage_dir(cfg, 'train')}/progress.jsonl", "a") as f:
            f.write(json.dumps({"event": "start", "step": step, "world": world}) + "\n")
    while step < stop:
        engine.train()
        length = seq_len_at(step, t)
        for m in range(t.grad_accum):
            first = step * t.batch_size + (m * world + rank) * micro
            x, y = data.train_batch(first, micro)
            _, aux = engine(x[:, :length], y[:, :length])
            engine.backward(aux["loss"])
            if own_norm and m == t.grad_accum - 1:  # gradients are all-reduced by now, not yet clipped
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()
                                                           if p.grad is not None])
            engine.step()
        # Busiest expert over the mean, worst layer, before the bias update resets the counts.
        imbalance = max(((g.counts.max() / g.counts.float().mean().clamp(min=1)).item() for g in gates),
                        default=1.0)
        engine.module.update_expert_bias()
        step += 1
        if rank == world - 1 and step == max(1, t.steps // 2):
            kill_once()  # no-op unless a kill test armed it
        tokens_done += t.batch_size * length
        loss = aux["lm"].detach().clone()
        dist.all_reduce(loss)
        grad_norm = grad_norm if own_norm else engine.get_global_grad_norm()
        metrics = {"step": step, "loss": loss.item() / world, "lr": lr_at(step - 1, t), "seq_len": length,
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "tokens_per_s": tokens_done / (time.perf_counter() - start), "expert_imbalance": imbalance,
                   "elapsed": time.perf_counter() - start}
        last = step == stop
        if step % t.eval_every == 0 or last:
            metrics["val_loss"] = evaluate(engine, data, micro, t.eval_batches)
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
            with open(f"{stage_dir(cfg, 'train')}/progress.jsonl", "a") as f:
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
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if writer:
        writer.close()


def is_complete(d: str | Path) -> bool:
    """A checkpoint folder holds every file its state lists, at full size, and valid weights."""
    from deepkiln.checkpoint import load_checkpoint

    d = Path(d)
    if not (d / STATE).is_file():
        return False
    files = json.loads((d / STATE).read_text())["files"]
    if not all((d / f).is_file() and (d / f).stat().st_size == n for f, n in files.items()):
        return False
    try:
        load_checkpoint(d / "model")
    except ValueError:
        return False
    return True


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

    fs, parent = resolve(f"{stage_dir(cfg, 'train')}/ray/{cfg.run.name}")
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


@torch.no_grad()
def evaluate(engine, data: TokenWindows, batch: int, max_batches: int) -> float:
    """Mean LM loss over the held-out windows (every rank evaluates the same ones)."""
    engine.eval()
    losses = [engine(x, y)[1]["lm"].item() for x, y in data.val_batches(batch, max_batches)]
    engine.train()
    return sum(losses) / len(losses)


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` whose local run_dir and token folder are absolute: Ray workers and Tune
    trials run in folders of their own. URIs are left as they are."""
    cfg = cfg.model_copy(deep=True)
    if "://" not in cfg.run.run_dir:
        cfg.run.run_dir = os.path.abspath(cfg.run.run_dir)
    if cfg.train.tokens and "://" not in cfg.train.tokens:
        cfg.train.tokens = os.path.abspath(cfg.train.tokens)
    return cfg


def make_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer for a resolved config: validated inputs, absolute local paths, storage under
    the run's train folder. A run name already in storage continues unless train.resume is off."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from deepkiln.ray_utils import compute_env

    cfg = with_absolute_paths(cfg)
    t = cfg.train
    check_inputs(cfg, t.num_workers)
    out = stage_dir(cfg, "train")
    os.makedirs(out, exist_ok=True)
    storage = f"{out}/ray"
    if not t.resume and os.path.isdir(os.path.join(storage, cfg.run.name)):
        shutil.rmtree(os.path.join(storage, cfg.run.name))  # reusing a run name continues it: start fresh
    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             callbacks=callbacks, worker_runtime_env={"env_vars": compute_env()}))
    return trainer, out


def main(argv=None):
    from deepkiln.ray_utils import fit, init_ray

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    trainer, out = make_trainer(cfg)
    init_ray()
    result = fit(trainer)
    with result.checkpoint.as_directory() as d:
        export = Path(out) / "model"
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(Path(d) / "model", export)
        shutil.copy(Path(d) / "loss.png", Path(out) / "loss.png")
        state = json.loads((Path(d) / STATE).read_text())
    summary = {"steps": state["step"], "precision": state.get("precision"), "history": state["history"], "model": str(export),
               "checkpoint": result.checkpoint.path, "final": result.metrics}
    (Path(out) / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"train: {state['step']} steps, final loss {state['history'][-1]['loss']:.3f}, "
          f"val loss {state['history'][-1].get('val_loss', float('nan')):.3f} -> {export}", flush=True)
    return summary


if __name__ == "__main__":
    main()
