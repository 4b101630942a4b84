import json

from deepkiln.checkpoint import load_checkpoint
from pipelines import quickstart


def test_quickstart_trains_checkpoints_and_samples(tmp_path, capsys):
    result = quickstart.main(["--run.run_dir", str(tmp_path), "--train.steps=40", "--train.log_every=10"])
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]          # ln(4096)=8.3 at the start
    ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt.manifest["step"] == 40
    saved = json.loads((tmp_path / "deepkiln" / "quickstart" / "config.json").read_text())
    assert saved["train"]["steps"] == 40
    assert result["sample"].startswith(quickstart.PROMPT) and len(result["sample"]) > len(quickstart.PROMPT)
    assert "step 40/40" in capsys.readouterr().out


def test_lr_schedule_warms_up_then_decays_to_floor():
    from deepkiln.config import TrainArgs

    t = TrainArgs(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [quickstart.lr_at(s, t) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert abs(quickstart.lr_at(100, t) - 0.1) < 1e-12
