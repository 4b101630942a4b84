"""Quantize: the serving artifacts of a trained model in bf16, int8 and nf4, and a report comparing them.

    python -m pipelines.quantize --config configs/tiny.yaml [--quant.source=path/to/checkpoint]
    ray job submit --working-dir . -- python -m pipelines.quantize --config configs/small.yaml

Reads the run's final model (`quant.source`, else the DP fine-tune's model when privacy.enabled, else
the training export <run_dir>/<run.name>/train/model; before there is one, the published weights
model.init names, so an imported model serves as it came) and the held-out
windows of the tokenizer stage's token shards, and writes <run_dir>/<run.name>/quantize/:
{bf16,int8,nf4}/ (checkpoint folders that `deepkiln.quantize.load_quantized` reads, each carrying the
tokenizer.model it was trained with; Serve loads the one `quant.format` names, and its tokenizer) and report.json with, per format, bytes on disk and in memory, the bytes
of the quantized layers' weights, held-out perplexity and its change against bf16, and greedy
decode tokens/s on this machine. On CPU quantization buys memory, not speed: the report shows both.
Artifacts store bf16; the figures are those of each artifact loaded back as Serve loads it, computing
in serve.dtype (auto: bf16 where the CPU has it natively, else fp32), named in the report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from deepkiln.checkpoint import save_checkpoint
from deepkiln.config import QuantArgs, load_config
from deepkiln.data import TokenWindows
from deepkiln.engine import Engine, SamplingParams
from deepkiln.evaluate import perplexity, windows
from deepkiln.hf import load_start
from deepkiln.model import Transformer
from deepkiln.paths import RunPaths, tokenizer_files
from deepkiln.precision import compute_dtype, describe
from deepkiln.quantize import apply_quantization, linear_weight_bytes, load_quantized, model_bytes, target_names

FORMATS = ("bf16", "int8", "nf4")
DECODE_PROMPT, DECODE_TOKENS, DECODE_BATCH = 32, 32, 4


def decode_tokens_per_s(model: Transformer, data: TokenWindows) -> float:
    """Greedy decoding of DECODE_BATCH held-out prompts together, in generated tokens per second."""
    x, _ = next(data.val_batches(DECODE_BATCH, 1))
    prompts = [row[:DECODE_PROMPT].tolist() for row in x]
    engine = Engine(model, max_batch=len(prompts), max_len=DECODE_PROMPT + DECODE_TOKENS + 1)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    start = time.perf_counter()
    done = engine.generate(prompts, SamplingParams(max_tokens=DECODE_TOKENS, temperature=0))
    return sum(len(r.output) for r in done) / (time.perf_counter() - start)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(os.cpu_count() or 1)
    paths = RunPaths.of(cfg)
    source, origin = load_start(cfg, paths.final_model)  # model.init's weights while the run has none
    state = source.state_dict()
    data = windows(cfg)
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"token shards hold ids up to {data.vocab_size - 1}: model.vocab_size={cfg.model.vocab_size} is too small")
    out = Path(paths.stage("quantize"))
    out.mkdir(parents=True, exist_ok=True)
    dtype = compute_dtype(cfg.serve.dtype)
    report = {"source": origin["source"], "step": origin["step"], "precision": describe(dtype), "formats": {}}
    with torch.device("meta"):
        names = target_names(Transformer(cfg.model), cfg.quant.keep)
    for fmt in FORMATS:
        args = QuantArgs(**{**cfg.quant.model_dump(), "format": fmt})
        model = Transformer(cfg.model)
        model.load_state_dict(state, strict=True)
        stored = apply_quantization(model, args)
        # Saved before any forward: what is served is exactly what was quantized.
        path = save_checkpoint(out / fmt, stored, {**cfg.to_dict(), "quant": args.model_dump()},
                               step=origin["step"] or 0, tokens=origin["tokens"] or 0,
                               files=tokenizer_files(paths.tokenizer_model))  # it travels with the weights
        model, _ = load_quantized(path, dtype)  # what Serve loads, in its compute dtype
        ppl = perplexity(model, data, cfg.train.batch_size, cfg.train.eval_batches)
        report["formats"][fmt] = {
            "path": str(path), "bytes_on_disk": disk_bytes(path), "bytes_in_memory": model_bytes(model),
            "linear_bytes": linear_weight_bytes(stored, names), "perplexity": round(ppl, 4),
            "decode_tokens_per_s": round(decode_tokens_per_s(model, data), 1),
        }
        print(f"quantize: {fmt} {report['formats'][fmt]}", flush=True)
    base = report["formats"]["bf16"]
    for fmt, r in report["formats"].items():
        r["perplexity_change"] = round(r["perplexity"] / base["perplexity"] - 1, 4)
        r["linear_bytes_vs_bf16"] = round(base["linear_bytes"] / r["linear_bytes"], 3)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"quantize: report -> {out / 'report.json'}", flush=True)
    return report


if __name__ == "__main__":
    main()
