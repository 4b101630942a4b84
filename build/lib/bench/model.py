"""Model throughput in the compute dtype `auto` picks on this host and in the other one, against this
host's GEMM peak in the dtype used, and the MLA cache size, in one JSON object.

    python -m bench.model                       # small preset, dtype auto (and the other for comparison)
    python -m bench.model --preset tiny         # under a minute on any host
    ray job submit --working-dir . -- python -m bench.model --preset small

Peak: the best of square matmuls in the measured dtype (256 up to 2048, stopping before a size whose
single matmul would take over a quarter second: seconds on any host). Throughput: forward+backward
of the full training loss (main model + MTP) on random tokens, in `--dtype` (default auto: bf16
where the CPU has it natively, fp32 elsewhere) and then in the other dtype, so the JSON shows which
is faster here. A dtype whose first step at batch 1 predicts more than `--budget-s` per step is not
measured (bf16 on an AVX2 host with the small preset: minutes per step); the JSON says so.
FLOPs per token: 6 x active matmul parameters (routed experts at their top-k share, the head
counted again for MTP, input embedding lookups not counted) + causal attention 3 x H x (qk_dim + v_dim) x T per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from deepkiln.engine import LatentCache
from deepkiln.flops import gemm_peak, model_flops_per_token
from deepkiln.model import PRESETS, ModelArgs, Transformer, lm_losses
from deepkiln.precision import DTYPES, compute_dtype, describe, dtype_name


def train_throughput(args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype, steps: int,
                     budget_s: float) -> float | None:
    """Tokens/s of forward+backward (full loss) after a warm-up step; None when a step at batch 1
    already predicts more than `budget_s` per step at `batch`."""
    model = Transformer(args).to(dtype).train()
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step(n: int) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        lm_losses(model(x[:n], mtp=True), y[:n], args)["loss"].backward()
        return time.perf_counter() - start

    step(1)  # first call: kernels built, memory allocated
    if step(1) * batch > budget_s:
        return None
    step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return batch * seq_len * steps / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=20.0, help="largest predicted step time measured")
    opts = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    args = PRESETS[opts.preset]
    dtype = compute_dtype(opts.dtype)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16

    peak = gemm_peak(dtype)
    tokens_per_s = train_throughput(args, opts.batch, opts.seq_len, dtype, opts.steps, float("inf"))
    tokens_per_s_other = train_throughput(args, opts.batch, opts.seq_len, other, opts.steps, opts.budget_s)
    with torch.device("meta"):
        flops = model_flops_per_token(Transformer(args), opts.seq_len)
    cache = LatentCache(args, max_batch=1, max_len=1, dtype=dtype)
    mha_bytes = args.n_layers * 2 * args.n_heads * args.v_head_dim * cache.kv.element_size()
    result = {
        "preset": opts.preset, "dtype_setting": opts.dtype, **describe(dtype), "other_dtype": dtype_name(other),
        "batch": opts.batch, "seq_len": opts.seq_len, "threads": torch.get_num_threads(),
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_other": None if tokens_per_s_other is None else round(tokens_per_s_other, 1),
        "speedup_vs_other": None if tokens_per_s_other is None else round(tokens_per_s / tokens_per_s_other, 2),
        "model_flops_per_token": flops,
        "achieved_flops": round(tokens_per_s * flops),
        "gemm_peak_flops": round(peak),
        "mfu": round(tokens_per_s * flops / peak, 4),
        "mla_cache_bytes_per_token": cache.bytes_per_token(),
        "mha_cache_bytes_per_token": mha_bytes,
        "cache_ratio_mha_over_mla": round(mha_bytes / cache.bytes_per_token(), 2),
    }
    if tokens_per_s_other is None:
        result["other_skipped"] = f"a step at batch 1 predicted over {opts.budget_s} s per step"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
