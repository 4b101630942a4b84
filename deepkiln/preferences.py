"""What users prefer, as training signal: preference data from feedback records, and the losses that
learn from it.

    items = preference_items(record, scale, online)      # the pairs and labels one feedback record gives
    logps = sequence_logps(model(x).logits, y)           # (B,) log P(completion | prompt)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    losses, rewards, kl = kto_loss(p, r, p_kl, r_kl, desirable, beta, *kto_weights(n_d, n_u))

A correction gives a pair: the user's answer over the served one, and the user's answer as a desirable
label. A rating at or above online.desirable_min labels the completion desirable, at or below
online.undesirable_max undesirable; the middle teaches nothing. Two rated completions of one prompt
give a ranked pair, its margin the rating difference over the scale's span (a correction's is 1).

The losses follow the papers and TRL's trainers (the tests compare them on the same model and batch):
DPO (Rafailov et al. 2023, sigmoid loss), KTO (Ethayarajh et al. 2024, with the batch's mismatched
completions as the KL baseline), Bradley-Terry with a margin for reward models (Llama 2).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepkiln.config import rating_cuts
from deepkiln.evaluate import IGNORE
from deepkiln.model import Transformer


@dataclass(frozen=True)
class Pair:
    """`chosen` preferred over `rejected` as answers to `prompt`; margin in (0, 1]."""
    prompt: str
    chosen: str
    rejected: str
    margin: float


@dataclass(frozen=True)
class Label:
    """`completion` of `prompt`, desirable or not (KTO's unpaired signal)."""
    prompt: str
    completion: str
    desirable: bool


def desirability(rating: int, scale, online) -> bool | None:
    """True (desirable), False (undesirable), or None (the middle of the scale: no signal)."""
    low, high = rating_cuts(scale, online)
    return True if rating >= high else False if rating <= low else None


def preference_items(record: dict, scale, online) -> list[Pair | Label]:
    """What one feedback record teaches on its own (ranked pairs need a second rating: `ranked_pair`)."""
    items: list[Pair | Label] = []
    served, correction = record["completion"], record.get("correction")
    if correction:
        if correction != served:
            items.append(Pair(record["prompt"], correction, served, 1.0))
        items.append(Label(record["prompt"], correction, True))
    label = desirability(record["rating"], scale, online)
    if label is not None and served and not (correction and label):  # a corrected answer is no good answer
        items.append(Label(record["prompt"], served, label))
    return items


def ranked_pair(a: dict, b: dict, scale) -> Pair | None:
    """The pair two rated completions of the same prompt give: the higher rated one chosen, margin
    the rating difference over the scale's span; None for equal ratings or equal completions."""
    if a["prompt"] != b["prompt"] or a["rating"] == b["rating"] or a["completion"] == b["completion"]:
        return None
    hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
    return Pair(a["prompt"], hi["completion"], lo["completion"],
                (hi["rating"] - lo["rating"]) / (scale.rating_max - scale.rating_min))


def encode_answer(tok, example: dict, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """`answer` to a feedback example's prompt as (ids, labels), labels on the answer and its stop:
    chat completions (ids "chatcmpl-...") keep their prompt as JSON messages and render with the chat
    template."""
    chat = example.get("completion_id", "").startswith("chatcmpl-")
    prompt = json.loads(example["prompt"]) if chat else example["prompt"]
    return tok.render_example(prompt, answer, max_len)


# -- losses -------------------------------------------------------------------------------------------

def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P(labelled tokens) of each row (B,): the sum over the positions whose target is not IGNORE;
    logits (B, T, V), targets (B, T)."""
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss of each pair (B,) and the implicit rewards beta * log(pi / pi_ref) of its
    chosen and rejected answers (detached). ln 2 where the policy is the reference."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) so that desirable_weight * n_desirable equals
    undesirable_weight * n_undesirable, the low end of the band [1, 4/3] the KTO paper recommends."""
    if not n_desirable or not n_undesirable:
        return 1.0, 1.0
    return n_undesirable / n_desirable, 1.0


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, policy_kl: torch.Tensor, ref_kl: torch.Tensor,
             desirable: torch.Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's loss of each example (B,), their implicit rewards beta * log(pi / pi_ref), and the KL
    baseline: the mean log-ratio over the batch's mismatched (prompt, completion) sequences, clamped at
    0 and not differentiated. `desirable` (B,) bool."""
    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    ratio = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach(), kl


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """A reward model's loss on pairs (B,): -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin)


# -- GRPO ---------------------------------------------------------------------------------------------

def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P of each target token (B, T), 0 where the target is IGNORE; logits (B, T, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logp * (targets != IGNORE)


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (N,): each reward less its group's mean, over the group's standard deviation
    (unbiased, as TRL's); groups are consecutive runs of `group` completions of one prompt."""
    r = rewards.float().view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def grpo_loss(logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip: float, kl_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss (DeepSeekMath, eq. 3): per token the clipped surrogate of the probability ratio to
    the rollout's policy times the sequence's advantage, less kl_coef x the k3 estimate of KL to the
    reference; averaged over each completion's tokens, then over completions. logps, old, ref, mask
    (B, T); advantages (B,). Returns the loss and (detached) the mean ratio, the share of tokens
    clipped and the mean KL."""
    ratio = torch.exp(logps - old)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    per_token = -(surrogate - kl_coef * kl)
    mask = mask.float()
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    n = mask.sum().clamp(min=1)
    clipped = ((ratio - 1).abs() > clip).float()
    return loss, {"ratio": ((ratio * mask).sum() / n).detach(), "clipped": ((clipped * mask).sum() / n).detach(),
                  "kl": ((kl * mask).sum() / n).detach()}


@contextlib.contextmanager
def recorded_routes(model: nn.Module):
    """Record the expert ids every router of `model` chooses in the forwards inside the block:
    yields {gate: ids (N, K)} (the last forward's), for `replayed_routes`."""
    from deepkiln.model import Gate

    routes: dict = {}
    hooks = [m.register_forward_hook(lambda gate, _, out: routes.__setitem__(gate, out[1].detach()))
             for m in model.modules() if isinstance(m, Gate)]
    try:
        yield routes
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def replayed_routes(routes: dict):
    """Every recorded router routes to its recorded experts in the forwards inside the block (the
    same token layout as when recorded): GRPO's update then sees the routing its rollout saw."""
    for gate, ids in routes.items():
        gate.replay = ids
    try:
        yield
    finally:
        for gate in routes:
            gate.replay = None


def rule_rewards(rules: list[str], completions: list[list[int]], stopped: list[bool], max_tokens: int) -> torch.Tensor:
    """Rule-based rewards (N,), summed over `rules`: "short" (1 - length / max_tokens: shorter
    answers preferred), "stop" (1 when the answer ended with a stop token, not at the length limit)."""
    total = torch.zeros(len(completions))
    for rule in rules:
        if rule == "short":
            total += torch.tensor([1 - len(c) / max_tokens for c in completions])
        elif rule == "stop":
            total += torch.tensor([float(s) for s in stopped])
        else:
            raise ValueError(f"online.rule_rewards: {rule!r} is not a rule (short, stop)")
    return total


# -- the reward model ---------------------------------------------------------------------------------

def reward_inputs(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A RewardModel's inputs: right-padded token rows (B, T) and each row's last position (B,)."""
    from deepkiln.tokenizer import PAD_ID

    x = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, ids in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
    return x, torch.tensor([len(ids) - 1 for ids in rows])


class RewardModel(nn.Module):
    """A scalar reward per sequence: a language model's final-normed hidden state at the sequence's
    last token, through a linear head. The backbone's output head becomes the identity (its `logits`
    are then the hidden states); everything else is the Transformer as trained."""

    def __init__(self, backbone: Transformer):
        super().__init__()
        backbone.head = nn.Identity()
        self.backbone = backbone
        self.score = nn.Linear(backbone.args.dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """tokens (B, T), last (B,): the position of each row's last token -> rewards (B,)."""
        h = self.backbone(tokens, logits_at=last).logits[:, 0]  # (B, dim)
        return self.score(h.float())[:, 0]


def load_reward(path: str | Path) -> tuple[RewardModel, dict]:
    """A reward model version written by pipelines.reward, and its config."""
    from deepkiln.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    model = RewardModel(Transformer(ckpt.model_args))
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval(), ckpt.config
