"""Quickstart: train the tiny model on built-in text, checkpoint it, reload it and print a sample.

    python -m pipelines.quickstart --config configs/tiny.yaml [--train.steps=100]
    ray job submit --working-dir . -- python -m pipelines.quickstart --config configs/tiny.yaml

Until the curation, tokenizer and Ray Train stages land, this stage stands in for them: it reads
Python's own language reference (`pydoc_data`, on every machine), uses raw UTF-8 bytes as tokens,
and trains in one process. It writes <run_dir>/<run.name>/quickstart/{config.json, checkpoint/}.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from deepkiln.checkpoint import load_model, save_checkpoint
from deepkiln.config import Config, load_config, save_config, stage_dir
from deepkiln.engine import Engine, SamplingParams
from deepkiln.model import Transformer
from pipelines.train import lr_at

PROMPT = "The for statement"


def builtin_bytes() -> torch.Tensor:
    """Python's language reference topics as one UTF-8 byte stream (about 1 MB, no download)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def train(cfg: Config, data: torch.Tensor) -> tuple[Transformer, list[float]]:
    t = cfg.train
    model = Transformer(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    micro = t.batch_size // t.grad_accum
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
    losses, start = [], time.perf_counter()
    for step in range(t.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        for _ in range(t.grad_accum):
            starts = torch.randint(0, len(data) - t.seq_len - 1, (micro,), generator=gen)
            chunk = torch.stack([data[s:s + t.seq_len + 1] for s in starts.tolist()])
            with autocast:
                _, aux = model(chunk[:, :-1], chunk[:, 1:])
            (aux["loss"] / t.grad_accum).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias()
        losses.append(aux["lm"].item())
        if step % t.log_every == 0 or step == t.steps - 1:
            rate = (step + 1) * t.batch_size * t.seq_len / (time.perf_counter() - start)
            print(f"step {step + 1}/{t.steps}  loss {losses[-1]:.3f}  lr {lr_at(step, t):.2e}  "
                  f"{rate:,.0f} tok/s", flush=True)
    return model, losses


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(stage_dir(cfg, "quickstart"))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")

    data = builtin_bytes()
    print(f"built-in corpus: {len(data):,} bytes of Python's language reference", flush=True)
    model, losses = train(cfg, data)
    ckpt = save_checkpoint(out / "checkpoint", model, cfg.to_dict(), step=cfg.train.steps,
                           tokens=cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len)
    print(f"checkpoint: {ckpt}")

    served, _ = load_model(ckpt, cfg.model)
    engine = Engine(served.to(torch.bfloat16), max_batch=1, max_len=cfg.model.max_seq_len)
    prompt = list(PROMPT.encode("utf-8"))
    req = engine.generate([prompt], SamplingParams(max_tokens=120, temperature=0.8, top_k=40,
                                                   seed=cfg.run.seed))[0]
    sample = bytes(prompt + req.output).decode("utf-8", errors="replace")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}\nsample:\n{sample}")
    return {"losses": losses, "checkpoint": str(ckpt), "sample": sample}


if __name__ == "__main__":
    main()
