"""The compute dtype: one place decides what every stage computes in.

    dtype = compute_dtype(cfg.train.dtype)            # "auto", "bfloat16" or "float32"

`auto` picks bfloat16 where the hardware computes it natively (CUDA devices that support it; CPUs
with AMX or AVX-512 BF16 whose ATen kernels run at the AVX-512 level) and float32 everywhere else.
On an AVX2-only CPU a bf16 matmul runs 30-40x slower than fp32 and a training step 8x slower
(FACTS.md, "This machine's ceiling"), so bf16 there is never the fast path. An explicit value wins.

ATen's level follows ATEN_CPU_CAPABILITY and oneDNN's follows ONEDNN_MAX_CPU_ISA: capping both at
AVX2 on an AVX-512 host (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`) makes it compute, and
`auto` choose, as an AVX2 host does.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# oneDNN ISA caps below AVX-512 BF16: with one of these set, its bf16 matmuls are emulated (slow).
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_capability() -> str:
    """ATen's vector level on this CPU: "AVX2", "AVX512", "DEFAULT", ... (torch's own name)."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes bf16 in hardware, so that bf16 is faster than fp32 there."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or cpu_capability() != "AVX512":
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_WITHOUT_BF16:
        return False
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def compute_dtype(setting: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """The dtype a stage computes in: `setting` when explicit, else bf16 where it is native, else fp32.
    `device` defaults to the current CUDA device when there is one, else the CPU. Logged once per process."""
    if setting not in ("auto", *DTYPES):
        raise ValueError(f"dtype={setting!r} must be one of auto, {', '.join(DTYPES)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if setting == "auto":
        dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    else:
        dtype = DTYPES[setting]
    _announce(setting, dtype_name(dtype), device.type, host(device)["cpu_capability"])
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def host(device: torch.device | str = "cpu") -> dict:
    """What a report or benchmark records of the machine its figures come from."""
    device = torch.device(device)
    info = {"device": device.type, "cpu_capability": cpu_capability(), "bf16_native": native_bf16(device),
            "amx": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(dtype: torch.dtype, device: torch.device | str = "cpu") -> dict:
    """{"dtype", "cpu_capability", ...}: the block every stage report and benchmark JSON carries."""
    return {"dtype": dtype_name(dtype), **host(device)}


@functools.cache
def _announce(setting: str, dtype: str, device: str, capability: str) -> None:
    if "RAY_RAYLET_PID" in os.environ:  # a Ray worker (a training rank, a replica): its driver says it
        return
    why = "explicit" if setting != "auto" else ("auto: native bf16" if dtype == "bfloat16" else "auto: no native bf16")
    # stderr: a process whose stdout is a protocol (a test's subprocess) stays readable.
    print(f"compute dtype {dtype} on {device} ({why}; CPU capability {capability})", file=sys.stderr, flush=True)
