"""What a training rank applies to the model from outside: the DeepSpeed engine and its config, the
learning-rate and sequence-length schedules, activation checkpointing, and the auxiliary-loss-free
balancing step. Shared by pretraining (pipelines.train), Tune trials and online updates; the Ray Train
worker functions that use it are in deepkiln/trainer.py.

    engine, dtype = build_engine(cfg, world)
    out = engine(x, mtp=True); engine.backward(lm_losses(out, y, cfg.model)["loss"]); engine.step()
    update_expert_bias(engine.module)        # after every optimizer step
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from deepkiln.config import Config, TrainArgs
from deepkiln.model import Block, Gate, MoE, Transformer

STATE = "train_state.json"   # step, world, history, files: written by rank 0 after the barrier


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


def deepspeed_config(*, batch_size: int, micro_batch: int, grad_accum: int, grad_clip: float, zero_stage: int,
                     dtype: torch.dtype, offload: bool = False) -> dict:
    """DeepSpeed's config for a global batch of `batch_size` sequences in micro-batches of `micro_batch`."""
    zero: dict = {"stage": zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": batch_size, "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum, "gradient_clipping": grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        # Offloaded state is stepped by our torch AdamW (fused), not DeepSpeed's compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
    }


def initialize(model: torch.nn.Module, params, *, lr: float, weight_decay: float, schedule, ds_config: dict):
    """deepspeed.initialize with fused AdamW (one pass over each parameter tensor: several times
    faster than the default on CPU) and a LambdaLR of `schedule(step)` (a factor of `lr`)."""
    import deepspeed

    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # DeepSpeed 0.19 calls torch.distributed.all_gather_into_tensor and reduce_scatter_tensor (ZeRO-2
    # and 3), which torch 2.13 deprecates: a FutureWarning in every rank that a user can do nothing about.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    with _stdout_without("built successfully"):  # DeepSpeed prints it in every rank, every run
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine


@contextlib.contextmanager
def _stdout_without(fragment: str):
    """Print what the block prints to stdout, but the lines containing `fragment`."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if fragment not in line]
        sys.stdout.write("".join(kept))


def build_engine(cfg: Config, world: int):
    """One pretraining rank's DeepSpeed engine over a fresh model, and the compute dtype it trains in
    (decided here, on the rank's own device: a CPU driver says nothing of a GPU worker)."""
    from deepspeed.utils import set_z3_leaf_modules

    from deepkiln.precision import compute_dtype

    t = cfg.train
    dtype = compute_dtype(t.dtype)
    torch.manual_seed(cfg.run.seed)  # same init on every rank
    if cfg.model.init:  # continued pretraining from published weights, each rank reading them
        from deepkiln.hf import load_hf_model

        model = load_hf_model(cfg.model.init, args=cfg.model)
    else:
        model = Transformer(cfg.model)
    if t.activation_checkpointing:
        apply_ac(model)
    if t.zero_stage == 3:
        set_z3_leaf_modules(model, [MoE])  # experts run in data-dependent order: gather MoE whole
    ds = deepspeed_config(batch_size=t.batch_size, micro_batch=t.batch_size // (world * t.grad_accum),
                          grad_accum=t.grad_accum, grad_clip=t.grad_clip, zero_stage=t.zero_stage, dtype=dtype,
                          offload=t.offload)
    engine = initialize(model, model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                        schedule=lambda step: lr_at(step, t) / t.lr, ds_config=ds)
    return engine, dtype


class Step(NamedTuple):
    lm: torch.Tensor              # the last micro-batch's LM loss
    grad_norm: float | None       # the global gradient norm before clipping, where DeepSpeed keeps none
    imbalance: float              # the busiest expert's load over the mean, worst layer
    strata: torch.Tensor | None   # with train.mixture: (2, strata) LM-loss sums and row counts of this rank


def train_step(engine, data, step: int, cfg: Config, rank: int, world: int) -> Step:
    """One pretraining optimizer step on this rank's share of batch `step` (train.grad_accum
    micro-batches, the curriculum's length), then the balancing step. The gradient norm is measured
    here at ZeRO-0 in fp32 (every rank holds whole gradients); elsewhere it is None: ask the engine."""
    from deepkiln.evaluate import sequence_losses
    from deepkiln.model import lm_losses

    t = cfg.train
    micro = t.batch_size // (world * t.grad_accum)
    length = seq_len_at(step, t)
    own_norm, grad_norm = t.zero_stage == 0 and not engine.bfloat16_enabled(), None
    strata = torch.zeros(2, len(data.strata)) if data.mixture else None
    for m in range(t.grad_accum):
        first = step * t.batch_size + (m * world + rank) * micro
        x, y = data.train_batch(first, micro)
        out = engine(x[:, :length], mtp=True)
        losses = lm_losses(out, y[:, :length], cfg.model)
        if strata is not None:  # each row's loss, to its stratum
            rows = torch.tensor([data.stratum(i) for i in range(first, first + micro)])
            strata[0].index_add_(0, rows, sequence_losses(out.logits.detach(), y[:, :length]).cpu())
            strata[1].index_add_(0, rows, torch.ones(micro))
        engine.backward(losses["loss"])
        if own_norm and m == t.grad_accum - 1:  # gradients are all-reduced by now, not yet clipped
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters()
                                                             if p.grad is not None]))
        engine.step()
    return Step(losses["lm"], grad_norm, update_expert_bias(engine.module), strata)


class _NotCounting(contextlib.AbstractContextManager):
    """Gates stop counting routes while a block is recomputed: each token is counted once."""

    def __init__(self, gates: list[Gate]):
        self.gates = gates

    def __enter__(self):
        for g in self.gates:
            g.counting = False

    def __exit__(self, *exc):
        for g in self.gates:
            g.counting = True


def apply_ac(model: Transformer) -> Transformer:
    """Activation checkpointing: in training, each block keeps only its input and is recomputed in
    the backward pass (less memory, about one more forward of compute). The blocks' forward is
    wrapped in place, so parameter names and checkpoints are unchanged."""
    for block in model.layers:
        assert isinstance(block, Block)
        gates = [m for m in block.modules() if isinstance(m, Gate)]
        plain = block.forward

        @functools.wraps(plain)
        def forward(x, rope, cache=None, absorb=False, _plain=plain, _block=block, _gates=gates):
            if not (_block.training and torch.is_grad_enabled() and cache is None):
                return _plain(x, rope, cache, absorb)
            return torch.utils.checkpoint.checkpoint(
                _plain, x, rope, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _NotCounting(_gates)))

        block.forward = forward
    return model


@torch.no_grad()
def update_expert_bias(model: torch.nn.Module, group=None) -> float:
    """Auxiliary-loss-free balancing, after each optimizer step: every router nudges its
    under-loaded experts up and over-loaded ones down by bias_update_rate, re-centred to mean zero,
    from the routes counted since the last call (summed over the data-parallel `group` when
    torch.distributed runs). Softmax routers (DeepSeek-V2's) keep a zero bias, as V2 and its
    transformers and vLLM implementations define them: they are counted, not moved. Returns the
    busiest expert's load over the mean, worst layer."""
    imbalance = 1.0
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        load = gate.counts.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=group)
        imbalance = max(imbalance, (load.max() / load.mean().clamp(min=1)).item())
        if gate.args.score_func == "sigmoid":
            gate.bias += gate.args.bias_update_rate * torch.sign(load.mean() - load)
            gate.bias -= gate.bias.mean()
        gate.counts.zero_()
    return imbalance


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
