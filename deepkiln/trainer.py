"""The Ray Train worker functions: pretraining ranks (`train_loop`, run by pipelines.train and by Tune
trials) and online-update ranks (`update_loop`, run by pipelines.online), and the TorchTrainer that
runs the first. Each worker is a DeepSpeed rank built by deepkiln.training. Ray is imported inside
the functions, so importing the library stays Ray-free.

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

import numpy as np
import torch

from deepkiln.config import Config
from deepkiln.evaluate import mean_loss, pad_rows, sequence_losses, windows
from deepkiln.paths import RunPaths, absolute
from deepkiln.preferences import dpo_loss, kto_loss, kto_weights, sequence_logps
from deepkiln.training import (STATE, build_engine, deepspeed_config, initialize, is_complete, lr_at, plot_losses,
                               seq_len_at, train_step, update_expert_bias)

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


class OnlyRank:
    """The one rank of a job that runs in its own process, without a worker group: an online update
    of one worker, in a Ray task. Its model goes to `out`, its metrics are returned."""
    rank, world = 0, 1

    def __init__(self, out: str):
        self.out = out

    def report(self, metrics: dict, folder: str) -> dict:
        import shutil

        shutil.rmtree(self.out, ignore_errors=True)  # a retried try's
        shutil.copytree(Path(folder) / "model", self.out)
        return metrics


class UpdateRank:
    """A rank of an online update's Ray Train worker group: rank 0's merged model goes to Ray Train."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict, folder: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None)


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
        lm, grad_norm, imbalance = train_step(engine, data, step, cfg, rank, world)
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
        last = step == stop
        if step % t.eval_every == 0 or last:
            metrics["val_loss"] = mean_loss(engine, data, micro, t.eval_batches)
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


# -- online updates ---------------------------------------------------------------------------------

def update_loop(config: dict, rank_of: UpdateRank | OnlyRank | None = None):
    """One DeepSpeed rank of an online update. Depends only on `config`: the resolved config, the base
    model folder, the encoded feedback examples, and the base-data cursor. The examples are, by
    online.method: supervised rows (ids, labels) with `weights` (lora, full: loss on their labelled
    tokens, each sequence counting once); pairs (chosen row, rejected row) for dpo; (row, mismatched
    row, desirable) for kto, the mismatched row (the prompt with another example's answer) feeding the
    KL baseline. Each batch mixes them with base windows, each sequence or pair counting once; routers'
    balancing bias steps after every optimizer step, as in pretraining. For dpo and kto the reference
    is the model as loaded (the serving version): its log-probabilities of every example this rank
    draws are computed once, before the first step. `rank_of`: where it runs (a Ray Train worker
    unless told otherwise); returns what its report does."""
    import torch.distributed as dist

    from deepkiln.checkpoint import load_model, save_checkpoint
    from deepkiln.faults import kill_once
    from deepkiln.lora import apply_lora, lora_parameters, merge_lora
    from deepkiln.precision import compute_dtype, describe

    cfg = Config.from_dict(config["cfg"])
    on = cfg.online
    place = rank_of or UpdateRank()
    rank, world = place.rank, place.world
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed + config["update"])
    model, base = load_model(config["base"])
    lora = (on.method if on.method in ("lora", "full") else on.params) == "lora"
    if lora:
        apply_lora(model, cfg.lora)
        params = lora_parameters(model)
    else:
        params = list(model.parameters())
    micro = on.batch_size // world
    dtype = compute_dtype(cfg.train.dtype)
    warmup = max(1, on.steps // 10)
    engine = initialize(model, params, lr=on.lr, weight_decay=0.0, schedule=lambda s: min(1.0, (s + 1) / warmup),
                        ds_config=deepspeed_config(batch_size=on.batch_size, micro_batch=micro, grad_accum=1,
                                                   grad_clip=cfg.train.grad_clip, dtype=dtype,
                                                   zero_stage=0 if lora else cfg.train.zero_stage))
    examples, weights = config["examples"], config["weights"]
    n_fb = min(micro, max(1, round(micro * on.feedback_fraction))) if examples and on.feedback_fraction else 0
    n_base = micro - n_fb
    data = windows(cfg) if n_base else None
    orders: dict[int, np.ndarray] = {}

    def picks(step: int) -> list[int]:
        """The examples of this rank's batch at `step`: an epoch over them is a seeded permutation."""
        out = []
        for j in range(n_fb):
            epoch, k = divmod((step * world + rank) * n_fb + j, len(examples))
            order = orders.setdefault(epoch, np.random.default_rng((cfg.run.seed, config["update"], epoch))
                                      .permutation(len(examples)))
            out.append(int(order[k]))
        return out

    preference = on.method in ("dpo", "kto")
    ref = reference_logps(engine, examples, sorted({i for s in range(on.steps) for i in picks(s)}), micro) \
        if preference and n_fb else {}
    desirable_w, undesirable_w = kto_weights(sum(e[2] for e in examples), sum(not e[2] for e in examples)) \
        if on.method == "kto" else (1.0, 1.0)
    losses, curves = [], {"preference_loss": [], "reward_chosen": [], "reward_rejected": [], "kl": []}
    for step in range(on.steps):
        idx = picks(step)
        base_rows = []
        if n_base:
            x, y = data.train_batch(config["base_first"] + (step * world + rank) * n_base, n_base)
            base_rows = [(ids, ids) for ids in torch.cat([x, y[:, -1:]], dim=1).tolist()]  # every token a target
        if not preference:
            x, y = pad_rows([examples[i] for i in idx] + base_rows)
            per_seq = sequence_losses(engine(x).logits, y)
            weight = torch.tensor([weights[i] for i in idx] + [1.0] * n_base)
            loss = (per_seq * weight).sum() / weight.sum()
            stats = torch.zeros(4)
        else:
            firsts = [examples[i][0] for i in idx]
            seconds = [examples[i][1] for i in idx] if on.method == "dpo" else []
            x, y = pad_rows(firsts + seconds + base_rows)
            logits = engine(x).logits
            n, m = len(firsts), len(firsts) + len(seconds)
            logps = sequence_logps(logits[:m], y[:m])
            if on.method == "dpo":
                pref, chosen, rejected = dpo_loss(logps[:n], logps[n:], torch.tensor([ref[i][0] for i in idx]),
                                                  torch.tensor([ref[i][1] for i in idx]), on.beta)
                kl = torch.zeros(())
            else:
                with torch.no_grad():  # the KL baseline is not differentiated (KTO; TRL's trainer alike)
                    kx, ky = pad_rows([examples[i][1] for i in idx])
                    policy_kl = sequence_logps(engine(kx).logits, ky)
                good = torch.tensor([bool(examples[i][2]) for i in idx])
                pref, rewards, kl = kto_loss(logps, torch.tensor([ref[i][0] for i in idx]), policy_kl,
                                             torch.tensor([ref[i][1] for i in idx]), good, on.beta,
                                             desirable_w, undesirable_w)
                chosen, rejected = rewards[good], rewards[~good]
            lm = sequence_losses(logits[m:], y[m:]).sum() if n_base else torch.zeros(())
            loss = (pref.sum() + lm) / (n + n_base)
            mean = lambda t: t.float().mean() if t.numel() else torch.tensor(float("nan"))  # noqa: E731
            stats = torch.stack([pref.mean().detach(), mean(chosen), mean(rejected), kl.float()])
        engine.backward(loss)
        engine.step()
        update_expert_bias(engine.module)
        reduced = torch.cat([loss.detach().reshape(1), stats])
        dist.all_reduce(reduced)
        reduced = (reduced / world).tolist()
        losses.append(reduced[0])
        if preference:
            for key, value in zip(curves, reduced[1:]):
                curves[key].append(value)
        if rank == world - 1 and step + 1 == max(1, on.steps // 2):
            kill_once()  # no-op unless a kill test armed it
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            model = engine.module
            if lora:
                merge_lora(model)
            save_checkpoint(Path(tmp) / "model", model, {**base.config, "online": on.model_dump()},
                            step=base.manifest.get("step", 0), tokens=base.manifest.get("tokens", 0))
        dist.barrier()
        metrics = {"losses": losses, "loss_first": losses[0], "loss_last": losses[-1], "precision": describe(dtype),
                   "feedback_per_batch": n_fb * world, "base_per_batch": n_base * world, "ranks": world}
        if preference:
            metrics["curves"] = curves
            if on.method == "kto":
                metrics["kto_weights"] = {"desirable": desirable_w, "undesirable": undesirable_w}
        return place.report(metrics, tmp)


@torch.no_grad()
def reference_logps(engine, examples: list, used: list[int], batch: int) -> dict[int, tuple[float, float]]:
    """The reference's log-probabilities of each used preference example's two rows (DPO: chosen and
    rejected; KTO: the answer and the mismatched one), in batches of `batch` rows, before any step:
    the model is still the one loaded."""
    rows = [(i, k) for i in used for k in (0, 1)]
    out: dict[int, list[float]] = {i: [0.0, 0.0] for i in used}
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        x, y = pad_rows([examples[i][k] for i, k in chunk])
        for (i, k), lp in zip(chunk, sequence_logps(engine(x).logits, y).tolist()):
            out[i][k] = lp
    return {i: (a, b) for i, (a, b) in out.items()}
