"""Weight quantization with bitsandbytes: int8 (LLM.int8, `Linear8bitLt`) and nf4 (`Linear4bit`).

`apply_quantization(model, QuantArgs)` swaps the model's `nn.Linear` layers in place, except those
whose qualified name has a part listed in `keep` (by default the embedding, the output head and the
MoE router gates stay unquantized: they are small and routing is sensitive to rounding; MLA's `wkv_b`
always does, see ALWAYS_KEPT). The quantized
model's state dict holds bitsandbytes' own packed weights and quantization statistics, so an
artifact saved with `deepkiln.checkpoint.save_checkpoint` loads back with `load_quantized` without
quantizing again.

Artifacts store bf16 (STORAGE_DTYPE) whatever the host computes in; `load_quantized(path, dtype)`
builds the model in the compute dtype (deepkiln.precision), bitsandbytes layers included: on a CPU
without native bf16, fp32 compute is many times faster than bf16.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from deepkiln.checkpoint import Checkpoint, load_checkpoint
from deepkiln.config import QuantArgs
from deepkiln.model import Transformer

STORAGE_DTYPE = torch.bfloat16
# MLA's absorbed decode path multiplies by wkv_b's weight matrix itself (folding it into the query and
# the output), so that layer always stays unquantized.
ALWAYS_KEPT = ("wkv_b",)


class _Once(logging.Filter):
    """Lets each distinct message through once: bitsandbytes warns that int8 layers cast their input
    to fp16 on every call (hundreds of identical lines per generation)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Once())
# On AVX-512 BF16 CPUs bitsandbytes tries to fetch an nf4 kernel from the Hugging Face hub through the
# `kernels` package at import, and warns in every process when it cannot; deepkiln downloads nothing
# at run time, so the fallback it takes is the one wanted, and the line is dropped (installed here,
# before bitsandbytes is imported, on the logger it uses).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())


def _kept(name: str, keep: list[str]) -> bool:
    return any(part in keep or part in ALWAYS_KEPT for part in name.split("."))


def _quantized_linear(layer: nn.Linear, args: QuantArgs, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    bias = layer.bias is not None
    if args.format == "int8":
        # threshold 0: every column in int8 (no fp16 outlier path), the smallest weights.
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias,
                                has_fp16_weights=False, threshold=0.0)
        weight = layer.weight.detach().float()
    else:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=dtype,
                              quant_type="nf4", compress_statistics=args.double_quant)
        # bitsandbytes' AVX512-BF16 path repacks the weight in place at the first eval forward: it
        # fails on layers whose in/out features are not multiples of 64/32, and state_dict() after
        # it writes statistics in the wrong layout. The portable path serves every shape and saves
        # what it loads.
        q.support_avx512bf16_for_cpu = False
        weight = layer.weight.detach().to(dtype)
    state = {"weight": weight}
    if bias:
        state["bias"] = layer.bias.detach().to(dtype)
    q.load_state_dict(state)
    return q.to(layer.weight.device)  # bitsandbytes quantizes on the move to a device


def target_names(model: nn.Module, keep: list[str]) -> list[str]:
    """The nn.Linear layers apply_quantization replaces: all but those named in `keep` (and wkv_b)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _kept(name, keep)]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def apply_quantization(model: nn.Module, args: QuantArgs, dtype: torch.dtype = STORAGE_DTYPE) -> nn.Module:
    """Cast `model` to `dtype` and, for int8/nf4, replace every nn.Linear not named in `args.keep` by
    its bitsandbytes counterpart holding the quantized weights and computing in `dtype` (int8 layers
    quantize their input through fp16 and answer in the input's dtype). Returns the model (changed in place)."""
    model.to(dtype).eval()
    if args.format == "bf16":
        return model
    names = target_names(model, args.keep)
    if not names:
        raise ValueError(f"quant.keep={args.keep} leaves no linear layer to quantize")
    for name in names:
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_linear(layer, args, dtype))
    return model.eval()  # the new layers start in training mode, where int8 takes another matmul path


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def linear_weight_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes held by the named layers' weights, quantization statistics included (not their bias)."""
    state = model.state_dict()
    return tensor_bytes(v for k, v in state.items()
                        if any(k.startswith(f"{n}.weight") or k.startswith(f"{n}.SCB") for n in names))


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything the model's state dict holds: what it occupies in memory for its weights."""
    return tensor_bytes(model.state_dict().values())


def load_quantized(path: str | Path, dtype: torch.dtype) -> tuple[Transformer, Checkpoint]:
    """Load an artifact written by pipelines.quantize: the model in the format its config names,
    computing in `dtype` (the stored bf16 weights are cast; quantized ones dequantize to it). A bf16
    artifact loads without importing bitsandbytes (~2.5 s of imports per process here)."""
    ckpt = load_checkpoint(path)
    args = QuantArgs(**ckpt.config.get("quant", {}))
    model = apply_quantization(Transformer(ckpt.model_args), args, dtype)
    state = dict(ckpt.state_dict)
    if args.format == "bf16":
        model.load_state_dict(state, strict=True)
        return model.eval(), ckpt
    import bitsandbytes as bnb

    # nf4 weights come back through bitsandbytes' own constructor for packed weights + statistics.
    for name, layer in quantized_layers(model).items():
        if isinstance(layer, bnb.nn.Linear4bit):
            prefix = f"{name}.weight."
            stats = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
            if f"{name}.weight" not in state or not stats:
                raise ValueError(f"{path}: {name} is not an nf4 layer in this artifact (quant.format={args.format})")
            layer.weight = bnb.nn.Params4bit.from_prequantized(  # the packed weight + its statistics
                state.pop(f"{name}.weight"), stats, requires_grad=False, device="cpu", module=layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith(".weight") and k[:-7] in quantized_layers(model)
                                          and args.format == "nf4")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match quant.format={args.format}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), ckpt
