"""Model throughput against this machine's own GEMM peak, and the MLA cache size, in one JSON object.

    python -m bench.model                       # small preset, bf16
    python -m bench.model --preset tiny --steps 3
    ray job submit --working-dir . -- python -m bench.model --preset small

Peak: the best of square matmuls (1024..4096) in the same run. Throughput: forward+backward of the
full training loss (main model + MTP) on random tokens. FLOPs per token: 6 x active matmul
parameters (routed experts at their top-k share, the head counted again for MTP, input embedding
lookups not counted) + causal attention 3 x H x (qk_dim + v_dim) x T per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from deepkiln.engine import LatentCache
from deepkiln.flops import gemm_peak, model_flops_per_token
from deepkiln.model import PRESETS, ModelArgs, Transformer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def train_throughput(args: ModelArgs, batch: int, seq_len: int, dtype: torch.dtype, steps: int) -> float:
    """Tokens/s of forward+backward (full loss) after two warm-up steps."""
    model = Transformer(args).to(dtype).train()
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        model.zero_grad(set_to_none=True)
        model(x, y)[1]["loss"].backward()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * seq_len * steps / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    opts = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    args, dtype = PRESETS[opts.preset], DTYPES[opts.dtype]

    peaks = {name: gemm_peak(dt) for name, dt in DTYPES.items()}
    tokens_per_s = train_throughput(args, opts.batch, opts.seq_len, dtype, opts.steps)
    with torch.device("meta"):
        flops = model_flops_per_token(Transformer(args), opts.seq_len)
    cache = LatentCache(args, max_batch=1, max_len=1, dtype=dtype)
    mha_bytes = args.n_layers * 2 * args.n_heads * args.v_head_dim * cache.kv.element_size()
    result = {
        "preset": opts.preset, "dtype": opts.dtype, "batch": opts.batch, "seq_len": opts.seq_len,
        "threads": torch.get_num_threads(),
        "tokens_per_s": round(tokens_per_s, 1),
        "model_flops_per_token": flops,
        "achieved_flops": round(tokens_per_s * flops),
        "gemm_peak_flops": round(peaks[opts.dtype]),
        "gemm_peak_flops_bf16": round(peaks["bfloat16"]),
        "gemm_peak_flops_fp32": round(peaks["float32"]),
        "mfu": round(tokens_per_s * flops / peaks[opts.dtype], 4),
        "mla_cache_bytes_per_token": cache.bytes_per_token(),
        "mha_cache_bytes_per_token": mha_bytes,
        "cache_ratio_mha_over_mla": round(mha_bytes / cache.bytes_per_token(), 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
