"""FLOP accounting: model FLOPs per training token, and this machine's GEMM peak to divide by.

FLOPs per token: 6 x active matmul parameters (routed experts at their top-k share, the shared head
counted again for MTP, input embedding lookups not counted) + causal attention
3 x H x (qk_dim + v_dim) x T per layer (forward + backward, half the T x T scores).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from deepkiln.model import Transformer, count_params
from deepkiln.precision import cpu_capability, dtype_name


SIZES = (256, 512, 1024, 2048)


def gemm_peak(dtype: torch.dtype, seconds: float = 1.0, max_matmul_s: float = 0.25) -> float:
    """Best FLOP/s of n x n x n matmuls in `dtype` on this process's threads, n growing through
    SIZES while the next size's single matmul is predicted to take under `max_matmul_s`, so the
    measurement takes seconds on any host (a 4096 bf16 matmul takes minutes where bf16 is emulated)."""
    best = 0.0
    for n in SIZES:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up: oneDNN builds a kernel per new shape
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / len(SIZES) or reps < 1:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / elapsed)
        if 8 * elapsed / reps > max_matmul_s:  # the next size costs 8x this one
            break
    return best


def cached_gemm_peak(dtype: torch.dtype) -> float:
    """gemm_peak measured once per host, dtype, thread count and torch version, then read from
    $DEEPKILN_CACHE (default ~/.cache/deepkiln)/gemm_peak.json: the denominator of the training log's MFU."""
    folder = Path(os.environ.get("DEEPKILN_CACHE") or Path.home() / ".cache" / "deepkiln")
    path = folder / "gemm_peak.json"
    key = f"{_cpu_name()}|{cpu_capability()}|{dtype_name(dtype)}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = gemm_peak(dtype)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".gemm_peak.json.{os.getpid()}"
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: measure again next time
    return known[key]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def model_flops_per_token(model: Transformer, seq_len: int) -> int:
    a = model.args
    _, active = count_params(model)
    mtp = sum(p.numel() * (a.n_activated_experts / a.n_routed_experts if ".experts." in n else 1)
              for n, p in model.mtp.named_parameters())
    head = model.head.weight.numel() * a.n_mtp_layers  # the shared head runs again for MTP
    attn = 3 * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * seq_len
    return int(6 * (active + mtp + head) + attn * (a.n_layers + a.n_mtp_layers))
