"""pipelines.train on Ray Train + DeepSpeed: ZeRO stages, offload and activation checkpointing keep
the loss curve; a killed worker, a stop and a corrupt checkpoint, met by one run, resume to exactly
the uninterrupted run; bad input fails before any worker starts. (That 200 steps of ZeRO-2 on two
ranks learn the built-in corpus is asserted on the quickstart's own training run, in
tests/test_quickstart.py.)"""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from deepkiln.checkpoint import load_checkpoint
from pipelines import train

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

BASE = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"),
        "--train.batch_size=16", "--train.seq_len=128", "--train.lr=1e-2", "--train.num_workers=2", "--train.zero_stage=2",
        "--train.log_every=20", "--train.eval_every=1000", "--train.eval_batches=8"]
# The reference run's schedule: 12 steps, a checkpoint every 4, the sequence length growing from 32 to
# 128 over the first 4 steps (the curriculum; every run compared with it has the same).
SHORT = ["--train.steps=12", "--train.checkpoint_every=4", "--train.seq_len_start=32", "--train.curriculum_steps=4"]


@pytest.fixture(scope="module")
def tokens(builtin_run):
    return builtin_run["tokens"]


def run(tmp_path, tokens, name, *extra):
    return train.main(BASE + ["--run.run_dir", str(tmp_path), "--run.name", name, "--train.tokens", str(tokens), *extra])


def weights(summary) -> dict:
    return load_checkpoint(summary["model"]).state_dict


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k                         # bit-exact


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokens):
    """12 steps of ZeRO-2 without a stop: what every interrupted run must reproduce, and the
    reference curve of the other ZeRO stages. Also: the SIGINT handler in force before it."""
    handler = signal.getsignal(signal.SIGINT)
    return run(tmp_path_factory.mktemp("straight"), tokens, "straight", *SHORT), handler


def test_zero_stages_offload_and_activation_checkpointing_keep_the_loss_curve(tmp_path, tokens, straight):
    straight, _ = straight
    # In fp32 the stages differ only in reduction order: curves agree to 1e-3 nats at every step.
    # Offload moves the optimizer state (ZeRO-3: the parameters too) to the CPU and activation
    # checkpointing recomputes blocks in the backward pass: same math, other placement.
    # (In bf16, ZeRO-0 accumulates gradients in fp32 and ZeRO-2 reduces them in bf16; their curves
    # differ by up to ~0.05 nats mid-descent and meet again at the end.) The settings run one after
    # the other in one worker group, with pipelines.train's own steps (its z2 equals `straight`).
    from deepkiln.config import load_config
    from deepkiln.paths import absolute
    from deepkiln.ray_utils import fit, torch_trainer
    from deepkiln.testing import loss_curves

    cfg = absolute(load_config(BASE + SHORT + ["--run.run_dir", str(tmp_path), "--train.tokens", str(tokens)]))
    settings = {"z2": {}, "z0": {"train.zero_stage": 0}, "z3": {"train.zero_stage": 3},
                "moved": {"train.zero_stage": 3, "train.offload": True, "train.activation_checkpointing": True}}
    out = tmp_path / "curves.json"
    fit(torch_trainer(loss_curves, {"cfg": cfg.to_dict(), "settings": settings, "out": str(out)}, cfg, name="zero",
                      storage=str(tmp_path / "ray"), workers=2, max_failures=0))
    reference = np.array([h["loss"] for h in straight["history"]])
    assert len(reference) == 12 and reference[-1] < reference[0] - 0.3
    curves = {name: np.array(curve) for name, curve in json.loads(out.read_text()).items()}
    np.testing.assert_allclose(curves["z2"], reference, atol=1e-6, rtol=0)
    for name in ("z0", "z3", "moved"):
        np.testing.assert_allclose(curves[name], reference, atol=1e-3, rtol=0, err_msg=name)


def test_a_killed_worker_and_a_stop_resume_past_a_corrupt_checkpoint_to_the_same_weights(tmp_path, tokens, straight,
                                                                                       ray_local):
    """One run meets both interruptions: its last rank is SIGKILLed after step 6 (Ray Train restarts
    the worker group from the step-4 checkpoint) and the run stops after step 8; the step-8
    checkpoint is then cut short, and `--train.resume=true` falls back past it to step 4. Nothing is
    skipped, each restart repeats at most one checkpoint interval, and the weights at step 12 are
    bit-exact those of the uninterrupted run."""
    straight, _ = straight
    ray_local.unlink()                    # arm: the last rank kills itself once, after step 6
    run(tmp_path, tokens, "split", *SHORT, "--train.max_failures=2", "--train.stop_after=8")
    assert ray_local.exists()
    checkpoints = sorted(p for p in (tmp_path / "split" / "train" / "ray" / "split").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2                                   # steps 4 and 8
    model = checkpoints[-1] / "model" / "model.safetensors"
    with open(model, "r+b") as f:                                  # the step-8 upload was cut short
        f.truncate(model.stat().st_size // 2)
    resumed = run(tmp_path, tokens, "split", *SHORT, "--train.resume=true")  # continued on purpose
    log = [json.loads(line) for line in (tmp_path / "split" / "train" / "progress.jsonl").read_text().splitlines()]
    starts = [e["step"] for e in log if e.get("event") == "start"]
    steps = [e["step"] for e in log if "event" not in e]
    assert starts == [0, 4, 4]            # the restart after the kill, then the fall-back past step 8
    assert sorted(set(steps)) == list(range(1, 13))               # nothing skipped
    assert len(steps) - 12 <= 4 * 2                               # repeats <= one interval per restart
    assert resumed["steps"] == 12
    assert_same_weights(weights(resumed), weights(straight))


def test_bad_inputs_fail_before_any_worker_starts(tmp_path, tokens):
    with pytest.raises(ValueError, match="index.json is missing"):
        run(tmp_path, tmp_path / "nowhere", "x")
    with pytest.raises(ValueError, match="exceeds model.vocab_size=1024"):
        run(tmp_path, tokens, "x", "--model.vocab_size=1024", "--tokenizer.vocab_size=1024")
    with pytest.raises(ValueError, match="train.batch_size=6 is not divisible by train.num_workers=2 x train.grad_accum=2"):
        run(tmp_path, tokens, "x", "--train.batch_size=6", "--train.grad_accum=2")
    with pytest.raises(ValueError, match="train.offload=True needs train.zero_stage >= 1"):
        run(tmp_path, tokens, "x", "--train.offload=true", "--train.zero_stage=0")
    with pytest.raises(ValueError, match="train.seq_len_start=256 must be in 8..train.seq_len=128"):
        run(tmp_path, tokens, "x", "--train.seq_len_start=256", "--train.curriculum_steps=4")


def test_sequence_length_curriculum(straight):
    r, handler = straight  # the reference run grows its sequences from 32 to 128 over 4 steps
    # Ray Train's Ctrl-C handler is gone once the run is: a driver that goes on (the quickstart
    # serving, the online loop) stops on Ctrl-C again.
    assert signal.getsignal(signal.SIGINT) is handler
    lengths = [h["seq_len"] for h in r["history"]]
    assert lengths == [32, 56, 80, 104] + [128] * 8
    assert load_checkpoint(r["model"]).manifest["tokens"] == 16 * sum(lengths)
    assert r["history"][-1]["loss"] < r["history"][0]["loss"]
