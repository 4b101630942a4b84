from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from deepkiln.checkpoint import save_checkpoint
from deepkiln.config import Config, QuantArgs, load_config
from deepkiln.engine import Engine, SamplingParams
from deepkiln.model import Transformer
from deepkiln.precision import compute_dtype
from deepkiln.quantize import apply_quantization, linear_weight_bytes, load_quantized, quantized_layers

LAYER = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}


def KEPT(name):  # the default keep list, plus wkv_b (the absorbed attention path reads its matrix)
    return name == "head" or {"gate", "wkv_b"} & set(name.split("."))


def tiny():
    torch.manual_seed(0)
    return Transformer(Config().model)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_linear_layers_become_bitsandbytes_layers_except_the_kept_ones(fmt):
    base = tiny()
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    bf16_bytes = linear_weight_bytes(base.to(torch.bfloat16), [n for n in names if not KEPT(n)])
    model = apply_quantization(tiny(), QuantArgs(format=fmt))
    quantized = quantized_layers(model)
    kept = [n for n in names if n not in quantized]
    assert all(isinstance(m, LAYER[fmt]) for m in quantized.values())
    assert sorted(kept) == sorted(n for n in names if KEPT(n))
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in kept)
    weight = next(iter(quantized.values())).weight
    assert weight.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    q_bytes = linear_weight_bytes(model, list(quantized))
    assert q_bytes < bf16_bytes / (1.8 if fmt == "int8" else 3.0), (q_bytes, bf16_bytes)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_logits_stay_close_and_the_artifact_round_trips(tmp_path, fmt):
    tokens = torch.randint(0, 4096, (2, 24))
    ref = tiny().to(torch.bfloat16).eval()
    model = apply_quantization(tiny(), QuantArgs(format=fmt))
    cfg = Config(quant=QuantArgs(format=fmt)).to_dict()
    with torch.no_grad():
        b = model(tokens)[0].float()  # a forward before saving must not change what is saved
    save_checkpoint(tmp_path / "q", model, cfg)
    loaded, ckpt = load_quantized(tmp_path / "q", torch.bfloat16)
    assert quantized_layers(loaded).keys() == quantized_layers(model).keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        a, c = ref(tokens)[0].float(), loaded(tokens)[0].float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.5
    assert (a - b).abs().mean() < 0.1 * a.abs().mean() + 0.05
    assert torch.equal(c, b)  # the artifact serves exactly what was quantized
    out = Engine(loaded, max_batch=1, max_len=64).generate([tokens[0, :8].tolist()],
                                                          SamplingParams(max_tokens=5, temperature=0))
    assert len(out[0].output) == 5 and out[0].finish_reason == "length"


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(ValueError, match="leaves no linear layer"):
        apply_quantization(tiny(), QuantArgs(format="nf4", keep=["layers", "head", "mtp"]))


@pytest.mark.slow
def test_pipeline_writes_three_artifacts_and_a_report(served_run):
    import json

    report = served_run["report"]  # pipelines.quantize on the session's trained run
    formats = report["formats"]
    assert set(formats) == {"bf16", "int8", "nf4"}
    assert json.loads((served_run["root"] / "served" / "quantize" / "report.json").read_text()) == report
    assert report["precision"]["dtype"] == "float32"  # the figures are the artifacts' in serve.dtype
    for fmt, r in formats.items():
        model, _ = load_quantized(r["path"], compute_dtype())
        assert bool(quantized_layers(model)) == (fmt != "bf16")
        assert r["decode_tokens_per_s"] > 0 and r["bytes_on_disk"] > 0
    # The trained model beats chance (vocab 512) by far, and quantization costs little of it.
    assert formats["bf16"]["perplexity"] < 100
    assert abs(formats["int8"]["perplexity_change"]) < 0.05 and abs(formats["nf4"]["perplexity_change"]) < 0.2
    assert formats["nf4"]["linear_bytes_vs_bf16"] > 3 and formats["int8"]["linear_bytes_vs_bf16"] > 1.8
    assert formats["nf4"]["bytes_in_memory"] < formats["int8"]["bytes_in_memory"] < formats["bf16"]["bytes_in_memory"]


def test_a_served_artifact_keeps_its_tokenizer_when_the_stage_reruns(served_copy):
    """Each artifact carries the tokenizer its model was trained with (in its manifest); Serve's
    engine and ingress read that copy, so a re-run of the tokenizer stage, which replaces the run's
    tokenizer.model, does not change what a served model's ids decode to."""
    import json
    import random

    from deepkiln.paths import RunPaths, tokenizer_of
    from deepkiln.testing import paragraph
    from deepkiln.tokenizer import Tokenizer, train_tokenizer
    from serve.engine_process import load_engine

    _, argv = served_copy
    cfg = load_config(argv + ["--quant.format=nf4"])
    paths = RunPaths.of(cfg)
    manifest = json.loads((Path(paths.artifact) / "manifest.json").read_text())
    assert manifest["files"]["tokenizer.model"]["bytes"] == Path(paths.tokenizer_model).stat().st_size
    ids = Tokenizer.load(tokenizer_of(cfg, paths.artifact)).encode("The river runs past the market")
    before = Tokenizer.load(tokenizer_of(cfg, paths.artifact)).decode(ids)
    rng = random.Random(1)  # the stage re-run: another tokenizer replaces the run's
    Tokenizer(train_tokenizer([paragraph(rng, 40)[::-1] for _ in range(100)], 320)).save(paths.tokenizer_model)
    assert Tokenizer.load(paths.tokenizer_model).vocab_size == 320  # the run's tokenizer did change
    assert tokenizer_of(cfg, paths.artifact) == str(Path(paths.artifact) / "tokenizer.model")
    assert Tokenizer.load(tokenizer_of(cfg, paths.artifact)).decode(ids) == before
    _, engine, _ = load_engine(cfg, paths.artifact)
    assert engine.vocab_size == 512  # the artifact's tokenizer bounds what it samples, not the new one's 320
