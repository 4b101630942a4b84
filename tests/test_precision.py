"""The compute dtype: `auto` on each kind of host (capability probes patched), explicit values, and
the dtype reaching the objects that compute: the DeepSpeed engine, the serving engine, bitsandbytes."""

import json
import random

import bitsandbytes as bnb
import pytest
import torch

from deepkiln import flops, precision
from deepkiln.checkpoint import save_checkpoint
from deepkiln.config import Config, QuantArgs, load_config
from deepkiln.model import Transformer
from deepkiln.precision import compute_dtype
from deepkiln.quantize import apply_quantization
from deepkiln.tokenizer import Tokenizer, train_tokenizer
from deepkiln.testing import free_port, paragraph

# capability (ATen's level), AMX tiles, AVX-512 BF16
HOSTS = {"avx2": ("AVX2", False, False), "avx512": ("AVX512", False, False),
         "avx512_bf16": ("AVX512", False, True), "amx": ("AVX512", True, True),
         "avx512_bf16_capped_to_avx2": ("AVX2", False, True)}  # ATEN_CPU_CAPABILITY=avx2 on such a CPU


def as_host(monkeypatch, name: str, cuda: bool | None = None) -> None:
    """Make the probes describe host `name` (and a CUDA device, with or without bf16, if `cuda` is set)."""
    capability, amx, bf16 = HOSTS[name]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bool(cuda))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a patched GPU")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize("host, expected", [("avx2", torch.float32), ("avx512", torch.float32),
                                            ("avx512_bf16", torch.bfloat16), ("amx", torch.bfloat16),
                                            ("avx512_bf16_capped_to_avx2", torch.float32)])
def test_auto_is_bf16_only_where_the_cpu_has_it_natively(monkeypatch, host, expected):
    as_host(monkeypatch, host)
    assert compute_dtype("auto") == expected
    assert precision.describe(expected)["cpu_capability"] == HOSTS[host][0]


def test_auto_follows_a_cuda_device_and_a_onednn_cap(monkeypatch):
    as_host(monkeypatch, "avx2", cuda=True)
    assert compute_dtype("auto") == torch.bfloat16            # the GPU decides, not the host CPU
    as_host(monkeypatch, "amx", cuda=False)                    # a GPU without native bf16
    assert compute_dtype("auto") == torch.float32
    as_host(monkeypatch, "amx")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")           # oneDNN emulates bf16 below AVX-512 BF16
    assert compute_dtype("auto") == torch.float32


@pytest.mark.parametrize("host", ["avx2", "amx"])
def test_an_explicit_dtype_wins(monkeypatch, host):
    as_host(monkeypatch, host)
    assert compute_dtype("bfloat16") == torch.bfloat16 and compute_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="dtype='fp16' must be one of auto"):
        compute_dtype("fp16")


def test_config_dtypes_default_to_auto_and_refuse_others():
    cfg = Config()
    assert cfg.train.dtype == "auto" and cfg.serve.dtype == "auto"
    with pytest.raises(ValueError, match="serve.dtype"):
        load_config(["--serve.dtype=float16"])


@pytest.fixture(scope="module")
def dist_group():
    """A one-rank gloo group, as Ray Train sets one up for each worker (with its environment). One for
    the module: DeepSpeed keeps the first group it sees."""
    import os

    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield
    dist.destroy_process_group()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("host, expected", [("avx2", torch.float32), ("avx512_bf16", torch.bfloat16)])
def test_the_deepspeed_engine_trains_in_the_chosen_dtype(monkeypatch, dist_group, host, expected):
    from deepkiln.model import lm_losses
    from deepkiln.training import build_engine

    as_host(monkeypatch, host)
    engine, dtype = build_engine(load_config(["--train.zero_stage=0"]), world=1)
    assert dtype == expected and engine.bfloat16_enabled() == (expected == torch.bfloat16)
    assert {p.dtype for p in engine.module.parameters()} == {expected}
    x = torch.randint(0, 4096, (2, 16))
    engine.backward(lm_losses(engine(x, mtp=True), x, engine.module.args)["loss"])
    engine.step()  # the step runs in that dtype too
    assert {p.dtype for p in engine.module.parameters()} == {expected}
    assert all(g.bias.dtype == torch.float32 for g in engine.module.modules() if hasattr(g, "counts"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An nf4 and an int8 artifact of the tiny model, and a tokenizer: what a replica loads."""
    root = tmp_path_factory.mktemp("precision")
    rng = random.Random(0)
    Tokenizer(train_tokenizer([paragraph(rng) for _ in range(200)], 512)).save(root / "tokenizer.model")
    argv = ["--tokenizer.vocab_size=512", "--serve.tokenizer", str(root / "tokenizer.model")]
    for fmt in ("nf4", "int8"):
        args = QuantArgs(format=fmt)
        model = apply_quantization(Transformer(Config().model), args)
        save_checkpoint(root / fmt, model, {**load_config(argv).to_dict(), "quant": args.model_dump()})
    return root, argv


@pytest.mark.parametrize("host, expected", [("avx2", torch.float32), ("avx512_bf16", torch.bfloat16),
                                            ("amx", torch.bfloat16)])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_the_serving_engine_and_bitsandbytes_layers_compute_in_the_chosen_dtype(monkeypatch, served, host,
                                                                                expected, fmt):
    from deepkiln.engine import SamplingParams
    from serve.engine_process import load_engine

    root, argv = served
    as_host(monkeypatch, host)
    _, engine, info = load_engine(load_config(argv), str(root / fmt))
    assert info["dtype"] == precision.dtype_name(expected)
    assert engine.model.embed.weight.dtype == expected and engine.model.head.weight.dtype == expected
    assert engine.cache.kv.dtype == expected and engine.cache.pe.dtype == expected
    layers = [m for m in engine.model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert layers
    if fmt == "nf4":
        assert {m.compute_dtype for m in layers} == {expected}
    # int8 layers quantize their input through fp16 and answer in the input's dtype: the model's
    with torch.no_grad():
        out = layers[0](torch.randn(3, layers[0].in_features, dtype=expected))
    assert out.dtype == expected
    done = engine.generate([[1, 5, 9, 13]], SamplingParams(max_tokens=4, temperature=0))
    assert len(done[0].output) == 4


def test_the_gemm_peak_is_measured_once_per_host_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPKILN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(flops, "gemm_peak", lambda dtype: calls.append(dtype) or 1e11)
    assert flops.cached_gemm_peak(torch.float32) == 1e11 and flops.cached_gemm_peak(torch.float32) == 1e11
    assert calls == [torch.float32]
    flops.cached_gemm_peak(torch.bfloat16)  # another dtype is another measurement
    assert calls == [torch.float32, torch.bfloat16]
    keys = list(json.loads((tmp_path / "gemm_peak.json").read_text()))
    assert len(keys) == 2 and all("threads=" in k and "float32" in keys[0] for k in keys)


def test_the_gemm_peak_stops_growing_before_a_slow_size(monkeypatch):
    # The sizes grow only while the next one's single matmul is predicted under max_matmul_s, so
    # bf16 emulated on an AVX2 host costs seconds, not the minutes a 4096 matmul took there.
    sizes, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: sizes.append(shape[0]) or randn(*shape, **kw))
    assert flops.gemm_peak(torch.float32, seconds=0.05, max_matmul_s=1e-9) > 0
    assert set(sizes) == {flops.SIZES[0]}
    sizes.clear()
    assert flops.gemm_peak(torch.float32, seconds=0.05, max_matmul_s=float("inf")) > 0
    assert set(sizes) == set(flops.SIZES)
