"""Train: Ray Train TorchTrainer whose workers are DeepSpeed ranks (pretraining and fine-tuning).

    python -m pipelines.train --config configs/tiny.yaml [--train.steps=300 --train.zero_stage=2]
    ray job submit --working-dir . -- python -m pipelines.train --config configs/small.yaml

Reads the tokenizer stage's token shards (<run_dir>/<run.name>/tokenizer/tokens/, or train.tokens).
Each rank (deepkiln/trainer.py) builds the model and calls deepspeed.initialize (ZeRO 0-3, the
compute dtype train.dtype resolves to, gradient accumulation, clipping, AdamW with warmup + cosine);
gloo on CPU, NCCL on GPU. Every train.checkpoint_every steps
and at the end every rank saves its DeepSpeed state, all pass a barrier, and only then is the
checkpoint reported to Ray Train, together with a consolidated safetensors export (model/). Worker
failures restart from the last reported checkpoint (train.max_failures); `--train.resume=true`
continues the run of the same name on purpose. Rank 0 writes TensorBoard events, loss.png and a
progress line per log step. The final model is exported to <run_dir>/<run.name>/train/model/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deepkiln.checkpoint import copy_checkpoint
from deepkiln.config import load_config
from deepkiln.corpus import write_atomic
from deepkiln.paths import RunPaths
from deepkiln.training import STATE


def main(argv=None):
    from deepkiln.ray_utils import fit
    from deepkiln.trainer import make_trainer

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    trainer = make_trainer(cfg)
    result = fit(trainer)
    out = Path(RunPaths.of(cfg).stage("train"))
    with result.checkpoint.as_directory() as d:
        export = copy_checkpoint(Path(d) / "model", out / "model")
        write_atomic(str(out / "loss.png"), (Path(d) / "loss.png").read_bytes())
        state = json.loads((Path(d) / STATE).read_text())
    summary = {"steps": state["step"], "precision": state.get("precision"), "history": state["history"],
               "model": str(export.resolve()), "checkpoint": result.checkpoint.path, "final": result.metrics}
    write_atomic(str(out / "train_summary.json"), json.dumps(summary, indent=1).encode())
    print(f"train: {state['step']} steps, final loss {state['history'][-1]['loss']:.3f}, "
          f"val loss {state['history'][-1].get('val_loss', float('nan')):.3f} -> {export}", flush=True)
    return summary


if __name__ == "__main__":
    main()
