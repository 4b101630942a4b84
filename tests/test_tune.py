import json

import pytest
import yaml

from deepkiln.config import load_config
from tests.ray_cluster import submit_job
from tests.test_train import BASE

pytestmark = [pytest.mark.slow]


def test_four_asha_trials_with_one_retried_from_its_checkpoint(tmp_path, builtin_run, ray_head):
    """Tune under `ray job submit`: 4 ASHA trials of one worker each, two at a time on 2 CPUs.
    One trial's worker is SIGKILLed once after step 6 (the marker file); with train.max_failures=0
    the trial itself fails, and Tune's retry continues it from its checkpoint at step 3."""
    marker = tmp_path / "kill-once"  # absent: armed
    job = submit_job(ray_head, "-m", "pipelines.tune", *BASE, "--run.run_dir", str(tmp_path), "--run.name", "tune",
                     "--train.tokens", str(builtin_run["tokens"]), "--train.num_workers=1",
                     "--train.cpus_per_worker=0.95", "--train.max_failures=0", "--train.seq_len=64",
                     "--tune.num_samples=4", "--tune.max_steps=12", "--tune.reports=4",
                     runtime_env={"env_vars": {"DEEPKILN_KILL_ONCE": str(marker)}})
    assert job.returncode == 0 and "succeeded" in job.stdout.lower(), job.stdout[-4000:] + job.stderr[-4000:]
    assert marker.exists()  # the kill happened
    out = tmp_path / "tune" / "tune"
    summary = json.loads((out / "tune_summary.json").read_text())
    assert summary["trials"] == 4 and summary["errors"] == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and "val_loss" in rows[0] and "config/train.lr" in rows[0]
    assert (out / "trials.png").stat().st_size > 1000

    # The retried trial: a second start, at the step-3 checkpoint, not from scratch.
    starts = {}
    for log in (out / "trials").glob("*/train/progress.jsonl"):
        events = [json.loads(line) for line in log.read_text().splitlines()]
        starts[log.parts[-3]] = [e["step"] for e in events if e.get("event") == "start"]
    assert len(starts) == 4
    assert sorted(s for s in starts.values() if len(s) > 1) == [[0, 3]], starts

    # best.yaml is the given config with the best trial's hyperparameters, ready for pipelines.train.
    best = load_config(["--config", str(out / "best.yaml")])
    assert best.train.lr == pytest.approx(summary["best"]["train.lr"])
    assert best.train.batch_size == summary["best"]["train.batch_size"]
    assert best.model.bias_update_rate == pytest.approx(summary["best"]["model.bias_update_rate"])
    assert best.train.steps == load_config(BASE).train.steps and best.run.name == "tune"
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["lr"] == best.train.lr
