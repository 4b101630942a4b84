"""Audit: held-out perplexity and a Fairlearn bias report of a model checkpoint, with pass/fail gates.

    python -m pipelines.audit --config configs/tiny.yaml [--fairness.model=runs/tiny/dp_finetune/model]
    ray job submit --working-dir . -- python -m pipelines.audit --config configs/tiny.yaml --run.run_dir=$PWD/runs

(A job runs in a copy of the working folder: give it an absolute run_dir, local or on a shared
file system, where the earlier stages wrote.)

Reads the checkpoint fairness.model (default: the run's final model: the DP fine-tune's when
privacy.enabled, else the train stage's export <run_dir>/<run.name>/train/model),
the tokenizer and the held-out windows of the tokenizer stage's token shards. Audits the built-in
templated prompts (fairness.attributes x fairness.languages) and, with fairness.data, a jsonl of
{group, prompt, continuation?} rows. Writes <run_dir>/<run.name>/audit/: report.json and one bar
chart per metric (perplexity.png, outcome_rate.png). In Python, `run_audit(cfg, path)` audits any
model folder and returns {"passed": bool, "reasons": [...], "perplexity": ...}.

The gate fails when a group's perplexity over the best group's exceeds fairness.max_perplexity_ratio,
when the outcome-rate difference between groups exceeds fairness.max_outcome_difference, or when
the held-out perplexity exceeds fairness.max_perplexity (if set); each failure is a reason.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from deepkiln.checkpoint import load_model
from deepkiln.config import Config, load_config
from deepkiln.evaluate import perplexity, windows
from deepkiln.fairness import audit, builtin_examples, gate, load_examples, plot
from deepkiln.paths import RunPaths
from deepkiln.precision import compute_dtype, describe
from deepkiln.tokenizer import load_tokenizer

METRICS = ("perplexity", "outcome_rate")


def run_audit(cfg: Config, model_dir: str | Path, out: str | Path | None = None) -> dict:
    """Audit the checkpoint in `model_dir` and write the report and charts to `out` (default:
    <run_dir>/<run.name>/audit). Returns the report: passed, reasons, perplexity, attributes, ..."""
    fa, paths = cfg.fairness, RunPaths.of(cfg)
    dtype = compute_dtype(cfg.serve.dtype)
    model, ckpt = load_model(model_dir, dtype=dtype)
    model.eval()
    tokenizer = load_tokenizer(paths.tokenizer_model)
    examples = builtin_examples(fa.attributes, fa.languages) + (load_examples(fa.data, fa) if fa.data else [])
    ppl = perplexity(model, windows(cfg), cfg.train.batch_size, cfg.train.eval_batches)
    summary = audit(model, tokenizer, examples, fa, cfg.run.seed)
    passed, reasons = gate(summary, ppl, fa)
    out = Path(out or paths.stage("audit"))
    out.mkdir(parents=True, exist_ok=True)
    charts = {}
    for metric in METRICS:
        charts[metric] = str(out / f"{metric}.png")
        plot(summary, metric, charts[metric])
    thresholds = {k: getattr(fa, k) for k in ("max_perplexity_ratio", "max_outcome_difference", "max_perplexity")}
    report = {"passed": passed, "reasons": reasons, "perplexity": round(ppl, 4), "model": str(model_dir),
              "step": ckpt.manifest.get("step"), "precision": describe(dtype), "thresholds": thresholds, "attributes": summary, "charts": charts,
              "config": cfg.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    verdict = "passed" if passed else "FAILED: " + "; ".join(reasons)
    print(f"audit: {model_dir}: perplexity {ppl:.3f}; " + "; ".join(
        f"{a} perplexity worst/best {s['perplexity']['worst_over_best']:.3f}, outcome difference "
        f"{s['outcome_rate']['difference']:.3f}" for a, s in summary.items()) + f" -> {verdict}", flush=True)
    return report


def main(argv=None) -> dict:
    if argv is None:  # from the command line (a Ray job's driver gets OMP_NUM_THREADS=1): every core
        torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    return run_audit(cfg, RunPaths.of(cfg).audit_model)


if __name__ == "__main__":
    main()
