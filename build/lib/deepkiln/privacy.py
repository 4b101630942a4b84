"""Differentially private training with Opacus (DP-SGD): what may train, the per-example loss,
Poisson sampling with per-sample clipping and noise, and the privacy budget.

    params = dp_trainable(model, "lora", cfg.lora)            # MoE and MTP layers frozen
    opt = torch.optim.AdamW(params, lr=cfg.privacy.lr)
    dp = apply_dp(model, opt, TensorDataset(x, y), cfg.privacy)
    for x, y in dp.loader:
        dp_backward(dp.module, x, y); dp.optimizer.step(); dp.optimizer.zero_grad()
    dp.epsilon(), dp.state()                                # save the state; epsilon never resets

Per-sample gradients are only per sample when every trainable layer sees the batch as its first
dimension. DeepSeekMoE flattens the batch into tokens before routing (the router, the experts and
the shared expert all run on rows of tokens from many examples), so Opacus would clip per token,
not per example: those layers stay frozen, as does MTP (not in the fine-tuning loss). The routers'
balancing bias is never updated either: it would move with the private data, without noise.
Opacus' strict validator is satisfied because every trainable layer is a stock nn.Linear,
nn.Embedding or nn.RMSNorm without buffers (the Gate's buffers sit on the Gate, beside its
nn.Linear). The model itself is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deepkiln.config import LoraArgs, PrivacyArgs
from deepkiln.evaluate import sequence_losses
from deepkiln.lora import apply_lora, lora_parameters
from deepkiln.model import MLP, MoE, Transformer


def check_delta(delta: float, n: int, unit: str) -> None:
    """delta must be below 1/N: at delta >= 1/N, publishing one random example outright is
    '(0, delta)-private', so the guarantee would mean nothing."""
    if n < 1:
        raise ValueError(f"the private set holds no {unit}: nothing to fine-tune on")
    if delta >= 1 / n:
        raise ValueError(f"privacy.delta={delta} must be below 1/N = {1 / n:.3g} "
                         f"(N = {n} private {unit}s in the training set)")


def dp_trainable(model: Transformer, params: str, lora: LoraArgs) -> list[nn.Parameter]:
    """Freeze `model`, then make trainable what DP-SGD can clip per example: LoRA adapters on the
    attention and dense-MLP layers ("lora"), or every weight outside the MoE and MTP layers ("full")."""
    for p in model.parameters():
        p.requires_grad_(False)
    if params == "lora":
        # A container over the allowed submodules: apply_lora wraps the layers inside it in place.
        allowed = nn.ModuleList([b.attn for b in model.layers] + [b.ffn for b in model.layers if isinstance(b.ffn, MLP)])
        apply_lora(allowed, lora)
        return lora_parameters(model)
    frozen = {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.parameters()}
    frozen |= {id(p) for p in model.mtp.parameters()}
    trainable = [p for p in model.parameters() if id(p) not in frozen]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's mean next-token loss (targets -100 ignored). Each
    example's term depends on that example alone, as DP-SGD needs; a mean over all tokens would
    weight an example by the other examples' lengths. No MTP or balance loss (no targets passed)."""
    return sequence_losses(model(x).logits, y).mean()


def dp_backward(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Backward of lm_loss; returns the loss. An empty Poisson batch (possible, if rare) is still a
    step: zero per-sample gradients, to which the optimizer adds noise and which the accountant counts."""
    if x.size(0) == 0:
        for p in module.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
        return None
    loss = lm_loss(module, x, y)
    loss.backward()
    return loss.item()


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    if seed >= 0:
        g.manual_seed(seed)
    else:
        g.seed()  # from OS entropy
    return g


def epsilon_of(history: list, delta: float, mechanism: str) -> float:
    """Epsilon spent by an accountant history [(noise_multiplier, sample_rate, steps), ...]."""
    if not history:
        return 0.0
    accountant = create_accountant(mechanism)
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta))


@dataclass
class Private:
    """A model, optimizer and loader made private by Opacus, and the accountant that goes with them."""
    module: nn.Module          # GradSampleModule around the model
    optimizer: torch.optim.Optimizer
    loader: DataLoader         # Poisson sampling: each example joins a step with probability sample_rate
    engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float
    planned_steps: int         # epochs / sample_rate, as Opacus counts them for make_private_with_epsilon
    args: PrivacyArgs

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.engine.accountant.history)

    def epsilon(self) -> float:
        return epsilon_of(self.engine.accountant.history, self.args.delta, self.args.accountant)

    def steps_within_budget(self, wanted: int) -> int:
        """The most steps, up to `wanted`, after which epsilon is still within target_epsilon
        (epsilon grows with every step at a fixed noise and sample rate: binary search)."""
        def fits(k: int) -> bool:
            history = [tuple(h) for h in self.engine.accountant.history]
            if history and history[-1][:2] == (self.noise_multiplier, self.sample_rate):
                history[-1] = (*history[-1][:2], history[-1][2] + k)  # the accountant merges runs too
            elif k:
                history.append((self.noise_multiplier, self.sample_rate, k))
            return epsilon_of(history, self.args.delta, self.args.accountant) <= self.args.target_epsilon

        if fits(wanted):
            return wanted
        lo, hi = 0, wanted  # fits(lo), not fits(hi)
        if not fits(0):
            return 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def state(self) -> dict:
        """What a resumed run needs to continue the accountant: JSON-serialisable."""
        return {"mechanism": self.args.accountant, "history": [list(h) for h in self.engine.accountant.history],
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "planned_steps": self.planned_steps}


def apply_dp(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset, args: PrivacyArgs,
             state: dict | None = None, unit: str = "example") -> Private:
    """Make (model, optimizer) private over `dataset` with Opacus: Poisson sampling at rate
    batch_size / N, flat per-sample clipping to max_grad_norm, Gaussian noise. The noise multiplier
    is args.noise_multiplier, or calibrated with make_private_with_epsilon to spend target_epsilon
    over args.epochs; a saved `state` (Private.state()) keeps its noise and continues its accountant."""
    check_delta(args.delta, len(dataset), unit)
    if state is not None and state["mechanism"] != args.accountant:
        raise ValueError(f"privacy.accountant={args.accountant!r}, but the saved privacy state was "
                         f"accounted with {state['mechanism']!r}: keep {state['mechanism']!r} to continue it")
    seed = args.noise_seed
    loader = DataLoader(dataset, batch_size=args.batch_size, generator=_generator(seed))
    engine = PrivacyEngine(accountant=args.accountant)
    common = dict(module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=args.max_grad_norm,
                  poisson_sampling=True, clipping="flat",
                  noise_generator=_generator(seed + 1 if seed >= 0 else -1))
    noise = state["noise_multiplier"] if state else args.noise_multiplier
    if noise > 0:
        module, optimizer, loader = engine.make_private(noise_multiplier=noise, **common)
    else:
        module, optimizer, loader = engine.make_private_with_epsilon(
            target_epsilon=args.target_epsilon, target_delta=args.delta, epochs=args.epochs, **common)
    if state:
        engine.accountant.load_state_dict({"mechanism": state["mechanism"],
                                           "history": [tuple(h) for h in state["history"]]})
    sample_rate = loader.sample_rate
    return Private(module, optimizer, loader, engine, optimizer.noise_multiplier, sample_rate,
                   int(args.epochs / sample_rate), args)
