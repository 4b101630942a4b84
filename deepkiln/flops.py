"""FLOP accounting: model FLOPs per training token, and this machine's GEMM peak to divide by.

FLOPs per token: 6 x active matmul parameters (routed experts at their top-k share, the shared head
counted again for MTP, input embedding lookups not counted) + causal attention
3 x H x (qk_dim + v_dim) x T per layer (forward + backward, half the T x T scores).
"""

from __future__ import annotations

import time

import torch

from deepkiln.model import Transformer, count_params


def gemm_peak(dtype: torch.dtype, sizes=(1024, 2048, 4096), seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n x n matmul over `sizes`, each timed for about `seconds`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or reps < 3:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def model_flops_per_token(model: Transformer, seq_len: int) -> int:
    a = model.args
    _, active = count_params(model)
    mtp = sum(p.numel() * (a.n_activated_experts / a.n_routed_experts if ".experts." in n else 1)
              for n, p in model.mtp.named_parameters())
    head = model.head.weight.numel() * a.n_mtp_layers  # the shared head runs again for MTP
    attn = 3 * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * seq_len
    return int(6 * (active + mtp + head) + attn * (a.n_layers + a.n_mtp_layers))
