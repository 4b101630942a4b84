"""Training throughput of pipelines.train (DeepSpeed ranks under Ray Train) with 1 and 2 workers,
against a plain single-process PyTorch loop on the same model, batch and dtype, in one JSON object.
The dtype is train.dtype=auto's choice on this host (bf16 where the CPU has it natively, else fp32).
In bf16 the plain loop keeps its weights in bf16 with no fp32 master copy: the pipeline (DeepSpeed
bf16, fp32 master weights and optimizer state) does more work per step than it, never less.

    python -m bench.train                         # small preset, dtype auto, batch 16 x 256, ZeRO-2
    python -m bench.train --preset tiny --steps 6

The plain loop runs twice: in a process with the allocator settings the Ray Train workers get
(`compute_env`, the baseline for `overhead_vs_plain`) and in this one, with glibc's defaults.
Tokens are random ids written as a token-shard folder (throughput does not depend on them).
Tokens/s is one step's tokens over the fastest step after two warm-up steps, for all three alike: on a
shared machine other tenants only ever slow a step down, and by minutes-long stretches, so the best
step compares the runs' own cost; MFU divides by the GEMM peak measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepkiln.config import load_config
from deepkiln.data import TokenWindows
from deepkiln.flops import gemm_peak, model_flops_per_token
from deepkiln.model import Transformer, lm_losses
from deepkiln.precision import compute_dtype, describe
from deepkiln.ray_utils import compute_env
from deepkiln.training import update_expert_bias
from pipelines import train

WARMUP = 2


def write_tokens(folder: Path, vocab: int, n_tokens: int) -> None:
    folder.mkdir(parents=True)
    ids = np.random.default_rng(0).integers(8, vocab, n_tokens, dtype=np.uint16)
    ids.tofile(folder / "bench.bin")
    shard = {"shard": "bench", "docs": 1, "tokens": n_tokens, "dtype": "uint16", "bin": "bench.bin"}
    (folder / "index.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint16", "shards": [shard]}))


def plain_tokens_per_s(cfg, tokens: Path, steps: int) -> float:
    """The same model, batch and dtype in one process, the leanest way plain PyTorch trains it: weights
    in the training dtype (no fp32 master copy), fused AdamW, clipping, the expert-bias update."""
    t = cfg.train
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(compute_dtype(t.dtype)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay,
                            fused=True)
    data = TokenWindows(tokens, t.seq_len)
    times = []
    for step in range(WARMUP + steps):
        start = time.perf_counter()
        x, y = data.train_batch(step * t.batch_size, t.batch_size)
        lm_losses(model(x, mtp=True), y, cfg.model)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model)
        times.append(time.perf_counter() - start)
    return t.batch_size * t.seq_len / min(times[WARMUP:])


def plain_in_worker_env(opts, tokens: Path) -> float:
    """plain_tokens_per_s in a fresh process started with the training workers' environment."""
    argv = [sys.executable, "-m", "bench.train", "--plain-only", str(tokens), "--preset", opts.preset,
            "--batch", str(opts.batch), "--seq-len", str(opts.seq_len), "--steps", str(opts.steps),
            "--zero-stage", str(opts.zero_stage)]
    out = subprocess.run(argv, env={**os.environ, **compute_env()}, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])["tokens_per_s_plain"]


def pipeline_tokens_per_s(argv: list[str], workers: int, steps: int, out: Path) -> float:
    cpus = (os.cpu_count() or 1) / workers
    train.main(argv + [f"--train.num_workers={workers}", f"--train.cpus_per_worker={cpus}",
                       f"--train.steps={WARMUP + steps}", "--run.run_dir", str(out), "--run.name", f"w{workers}"])
    log = [json.loads(line) for line in (out / f"w{workers}" / "train" / "progress.jsonl").read_text().splitlines()]
    elapsed = [e["elapsed"] for e in log if e.get("step", 0) >= WARMUP and "elapsed" in e]
    return tokens_per_step(argv) / min(b - a for a, b in zip(elapsed, elapsed[1:]))


def tokens_per_step(argv: list[str]) -> int:
    t = load_config(argv).train
    return t.batch_size * t.seq_len


def run_args(opts, tokens: Path) -> list[str]:
    """pipelines.train overrides for the benchmarked model, batch and data (no checkpoints, no evals)."""
    return ["--model.preset", opts.preset, f"--train.batch_size={opts.batch}", f"--train.seq_len={opts.seq_len}",
            f"--train.zero_stage={opts.zero_stage}", "--train.tokens", str(tokens),
            "--train.checkpoint_every=100000", "--train.eval_every=100000", "--train.eval_batches=1",
            "--train.warmup_steps=1", "--train.log_every=1", "--tokenizer.vocab_size=265"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--plain-only", metavar="TOKENS", help=argparse.SUPPRESS)  # the subprocess baseline
    opts = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if opts.plain_only:
        cfg = load_config(run_args(opts, Path(opts.plain_only)))
        print(json.dumps({"tokens_per_s_plain": plain_tokens_per_s(cfg, Path(opts.plain_only), opts.steps)}))
        return {}
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        args = run_args(opts, tokens)
        cfg = load_config(args)
        write_tokens(tokens, cfg.model.vocab_size, (WARMUP + opts.steps + 2) * opts.batch * opts.seq_len * 2)
        dtype = compute_dtype(cfg.train.dtype)
        peak = gemm_peak(dtype)
        with torch.device("meta"):
            flops = model_flops_per_token(Transformer(cfg.model), opts.seq_len)
        plain = plain_in_worker_env(opts, tokens)
        plain_default = plain_tokens_per_s(cfg, tokens, opts.steps)
        started = not ray.is_initialized()  # tests pass their own local Ray
        if started:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            one = pipeline_tokens_per_s(args, 1, opts.steps, Path(tmp))
            two = pipeline_tokens_per_s(args, 2, opts.steps, Path(tmp))
        finally:
            if started:
                ray.shutdown()
    result = {
        "preset": opts.preset, "batch": opts.batch, "seq_len": opts.seq_len, "zero_stage": opts.zero_stage,
        **describe(dtype), "gemm_peak_flops": round(peak), "model_flops_per_token": flops,
        "tokens_per_s": round(one, 1), "tokens_per_s_2": round(two, 1), "tokens_per_s_plain": round(plain, 1),
        "mfu": round(one * flops / peak, 4), "mfu_2": round(two * flops / peak, 4),
        "mfu_plain": round(plain * flops / peak, 4), "tokens_per_s_plain_default_malloc": round(plain_default, 1),
        "overhead_vs_plain": round(plain / one, 3), "scaling_2_vs_1": round(two / one, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
