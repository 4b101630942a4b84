"""Held-out evaluation in one place: the run's token windows, masked per-sequence losses, padding of
(ids, labels) rows, perplexity and continuation log-probabilities.

    data = windows(cfg)                                   # the run's token shards, split as training splits them
    ppl = perplexity(model, data, batch=8, max_batches=4)
    x, y = pad_rows([tok.render_example(prompt, target, max_len), ...])
    losses = sequence_losses(model(x).logits, y)          # (B,) mean loss over each row's labelled tokens

`model` is a Transformer or anything that calls like one (a DeepSpeed engine around it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deepkiln.data import TokenWindows
from deepkiln.tokenizer import PAD_ID

IGNORE = -100  # label of a token that is not scored


def windows(cfg) -> TokenWindows:
    """The run's token shards as training windows (held-out ones last), as every stage splits them."""
    from deepkiln.paths import RunPaths

    t = cfg.train
    return TokenWindows(RunPaths.of(cfg).tokens, t.seq_len, t.val_fraction, cfg.run.seed, t.mixture, t.mixture_by)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token loss of each position (B, T), 0 where the target is IGNORE; logits (B, T, V)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="none").view(targets.shape)


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss of each sequence over its labelled tokens (B,): every sequence counts once,
    whatever its length (what DP-SGD's per-example loss and the feedback targets need)."""
    mask = targets != IGNORE
    return token_losses(logits, targets).sum(1) / mask.sum(1).clamp(min=1)


def pad_rows(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for next-token prediction from (ids, labels) rows (labels IGNORE where a
    token is not scored), right-padded with PAD_ID: (B, T) each, T = the longest row - 1."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(labels) - 1] = torch.tensor(labels[1:])
    return x, y


@torch.no_grad()
def mean_loss(model, data: TokenWindows, batch: int, max_batches: int, stratum: str | None = None) -> float:
    """Mean next-token loss over the held-out windows (at most `max_batches` batches of `batch`; of
    one train.mixture stratum: `stratum`)."""
    was = model.training
    model.eval()
    losses = [F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE).item()
              for x, y in data.val_batches(batch, max_batches, stratum)]
    model.train(was)
    if not losses:
        raise ValueError("the token shards hold no held-out window: lower train.seq_len or raise train.val_fraction")
    return sum(losses) / len(losses)


def perplexity(model, data: TokenWindows, batch: int, max_batches: int) -> float:
    """exp of the mean held-out loss."""
    return math.exp(mean_loss(model, data, batch, max_batches))


@torch.no_grad()
def continuation_logprob(model, prompt: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt) under `model`, summed over the continuation's tokens."""
    ids = torch.tensor([prompt + continuation])
    logits = model(ids[:, :-1]).logits[0, len(prompt) - 1:].float()
    return -F.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
