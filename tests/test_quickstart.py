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
