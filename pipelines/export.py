"""Export: the run's final model for the ecosystem, as a transformers/vLLM folder, ONNX or a torch.export program.

    python -m pipelines.export --config configs/small.yaml --format hf --out exported/
    python -m pipelines.export --config configs/small.yaml --format onnx --out exported-onnx/
    python -m pipelines.export --config configs/small.yaml --format pt2 --out exported-pt2/

The model is the run's final one (`quant.source`, else the DP model when privacy is on, else the
training export), or, while the run has none, the folder `--model.init` names (so an imported
checkpoint exports back as it came).

- hf: DeepSeek's published layout (deepkiln.hf): config.json (DeepseekV3ForCausalLM for sigmoid
  routers, DeepseekV2ForCausalLM for softmax ones, with the keys vLLM routes by), safetensors weights
  (sharded beyond 4 GiB), the tokenizer (its SentencePiece model, a tokenizer_config.json that
  transformers' AutoTokenizer reads with deepkiln's ids, the chat template Serve uses),
  generation_config.json with the end tokens, and README.md, a model card. `--dtype`: the weights'
  dtype (auto: as stored; routers stay fp32).
- onnx: model.onnx, input `input_ids` (int64, batch x sequence), output `logits`, both axes dynamic,
  the MoE on its batched-matmul path; checked against PyTorch with onnxruntime at another shape
  before it is kept.
- pt2: model.pt2, the same graph as a torch.export program (`torch.export.load`).

The folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from deepkiln.config import Config, load_config
from deepkiln.corpus import read_bytes, replace_folder
from deepkiln.hf import load_start, write_hf_weights
from deepkiln.hf_config import hf_config
from deepkiln.model import Transformer, count_params
from deepkiln.paths import RunPaths
from deepkiln.tokenizer import Tokenizer, load_tokenizer, tokenizer_in

FORMATS = ("hf", "onnx", "pt2")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ONNX_CHECK_TOL = 1e-3  # logits of the ONNX graph against PyTorch's, fp32, at a second shape


def source_model(cfg: Config) -> tuple[Transformer, dict]:
    """The model to export, in fp32, and what is known of where it came from."""
    return load_start(cfg, RunPaths.of(cfg).final_model, torch.float32)


class Logits(torch.nn.Module):
    """input_ids (B, T) -> logits (B, T, V): the graph ONNX and torch.export capture."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def graph_model(model: Transformer) -> Logits:
    """The model on its batched-matmul MoE path (no data-dependent Python list), in eval mode."""
    bmm = Transformer(model.args.model_copy(update={"moe_impl": "bmm"}))
    bmm.load_state_dict(model.state_dict())
    return Logits(bmm.float()).eval()


def _dynamic():
    return {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}


def export_onnx(model: Transformer, out: Path, example=(2, 16), check=(3, 7)) -> dict:
    """Write out/model.onnx from an example of shape `example`, then run onnxruntime at shape `check`
    against PyTorch and refuse a graph that disagrees."""
    import numpy as np
    import onnxruntime

    graph = graph_model(model)
    example_ids = torch.randint(0, model.args.vocab_size, example)
    torch.onnx.export(graph, (example_ids,), str(out / "model.onnx"), input_names=["input_ids"],
                      output_names=["logits"], dynamic_shapes=_dynamic(), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, model.args.vocab_size, check)
    with torch.no_grad():
        expected = graph(ids).numpy()
    got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
    error = float(np.abs(got - expected).max())
    if error > ONNX_CHECK_TOL:
        raise RuntimeError(f"the ONNX graph's logits differ from PyTorch's by {error:.2e} at shape {check}")
    return {"file": "model.onnx", "inputs": {"input_ids": "int64 [batch, sequence]"},
            "outputs": {"logits": "float32 [batch, sequence, vocab]"}, "checked_shape": list(check),
            "max_abs_error": error}


def export_pt2(model: Transformer, out: Path, example=(2, 16)) -> dict:
    graph = graph_model(model)
    program = torch.export.export(graph, (torch.randint(0, model.args.vocab_size, example),),
                                  dynamic_shapes=_dynamic())
    torch.export.save(program, str(out / "model.pt2"))
    return {"file": "model.pt2", "inputs": {"input_ids": "int64 [batch, sequence]"}}


def _read(uri: str) -> dict | None:
    """A stage's JSON report, or None where the run has none (read_bytes: local paths and URIs alike)."""
    raw = read_bytes(uri)
    return json.loads(raw) if raw is not None else None


def model_card(cfg: Config, model: Transformer, origin: dict, tok) -> str:
    """README.md of the exported folder: what the model is, what made it, and its audit and DP
    reports when the run has them."""
    paths = RunPaths.of(cfg)
    total, active = count_params(model)
    a = model.args
    arch = "DeepseekV3ForCausalLM" if a.score_func == "sigmoid" else "DeepseekV2ForCausalLM"
    lines = ["---", "library_name: transformers", "tags: [deepkiln, deepseek, moe]", "---", "",
             f"# {cfg.run.name}", "",
             f"A DeepSeek-style mixture-of-experts model trained with deepkiln, in DeepSeek's published layout "
             f"(`{arch}`; loads with `AutoModelForCausalLM.from_pretrained` and vLLM).", "",
             "| | |", "|---|---|",
             f"| parameters | {total:,} ({active:,} active per token, MTP excluded) |",
             f"| layers / width / heads | {a.n_layers} / {a.dim} / {a.n_heads} |",
             f"| experts | {a.n_routed_experts} routed ({a.n_activated_experts} per token), "
             f"{a.n_shared_experts} shared, {a.score_func} router |",
             f"| multi-token prediction | {a.n_mtp_layers} module(s), at layer {a.n_layers} |",
             f"| context | {a.max_seq_len} tokens |",
             f"| source | `{origin['source']}` |"]
    if origin.get("step"):
        lines.append(f"| training | {origin['step']} steps, {origin.get('tokens') or 0:,} tokens |")
    prepared = _read(f"{paths.stage('prepare')}/prepare_report.json")
    if prepared:
        lines.append(f"| data | `{prepared.get('input')}`: {prepared.get('docs_out')} of {prepared.get('docs_in')} "
                     "documents kept after curation |")
    audit = _read(f"{paths.stage('audit')}/report.json")
    if audit:
        verdict = "passed" if audit.get("passed") else "failed: " + "; ".join(audit.get("reasons", []))
        lines.append(f"| fairness audit | {verdict} (held-out perplexity {audit.get('perplexity')}) |")
    dp = _read(f"{paths.stage('dp_finetune')}/report.json") if cfg.privacy.enabled else None
    if dp:
        lines.append(f"| differential privacy | (epsilon {dp.get('epsilon')}, delta {dp.get('delta')}), "
                     f"{dp.get('privacy_unit', 'example')}-level, {dp.get('accountant')} accountant |")
    if isinstance(tok, Tokenizer):
        lines += ["", "Chat: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders "
                  "deepkiln's template (`<|user|>...<|end|><|assistant|>`); generation stops at `</s>` or `<|end|>`."]
    else:
        lines += ["", "Chat: the imported tokenizer's own chat template (tokenizer_config.json)."]
    lines += ["A special token typed inside a message is read as that token by transformers; deepkiln's own "
              "server keeps it as text.", ""]
    return "\n".join(lines)


def source_tokenizer(cfg: Config, origin: dict):
    """The tokenizer the exported model's ids belong to: the imported folder's, or the run's."""
    found = tokenizer_in(origin["source"]) if origin["source"] == cfg.model.init else None
    path = found or Path(RunPaths.of(cfg).tokenizer_model)
    if not path.is_file():
        raise ValueError(f"{path} is missing: the exported folder needs the tokenizer the model was trained with")
    return load_tokenizer(path)


def export_hf(cfg: Config, model: Transformer, origin: dict, out: Path, dtype: str) -> dict:
    a = model.args
    torch_dtype = DTYPES.get(dtype)
    stored = str(torch_dtype or next(model.parameters()).dtype).removeprefix("torch.")
    tok = source_tokenizer(cfg, origin)
    if tok.vocab_size > a.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the model's vocabulary {a.vocab_size}")
    files = write_hf_weights(model, out, torch_dtype)
    stops = sorted({tok.eos_id, *tok.chat_stops})
    config = hf_config(a, bos_id=tok.bos_id, eos_id=stops if len(stops) > 1 else stops[0], dtype=stored)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": stops, "pad_token_id": tok.pad_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files += tok.save_hf(out, a.max_seq_len)
    (out / "README.md").write_text(model_card(cfg, model, origin, tok))
    return {"files": sorted([*files, "config.json", "generation_config.json", "README.md"]),
            "architecture": config["architectures"][0], "dtype": stored}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.export", description=__doc__.split("\n")[0],
                                     epilog="Any other --section.key=value sets the config, as in every stage.")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True, help="folder to write (replaced when the export is complete)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="hf: weights' dtype; auto keeps the stored one (routers stay fp32)")
    return parser.parse_known_args(argv)


def main(argv=None) -> dict:
    opts, rest = parse(sys.argv[1:] if argv is None else list(argv))
    cfg = load_config(rest)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    model, origin = source_model(cfg)
    model.eval()
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder (it is replaced when the export is complete)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    print(f"export: {opts.format} of {origin['source']} -> {out}", flush=True)
    if opts.format == "hf":
        report = export_hf(cfg, model, origin, tmp, opts.dtype)
    elif opts.format == "onnx":
        report = export_onnx(model, tmp)
    else:
        report = export_pt2(model, tmp)
    report = {"format": opts.format, **origin, **report, "seconds": round(time.perf_counter() - start, 1)}
    (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_folder(tmp, out)
    print(f"export: done in {report['seconds']} s -> {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
