import json
import random
import shutil

import pytest
import torch

from deepkiln.checkpoint import load_model
from pipelines import dp_finetune
from deepkiln.testing import copy_run as copy_of

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

NAMES = ["Alice", "Bob", "Chen", "Dana", "Eve", "Farid", "Grace", "Hiro"]
# Fast settings for the tiny run: short records, the faster accountant, seeded noise (tests only).
FAST = ["--train.seq_len=32", "--privacy.accountant=rdp", "--privacy.noise_seed=0", "--privacy.lr=3e-3",
        "--privacy.batch_size=16", "--privacy.delta=1e-3"]


@pytest.fixture(scope="module")
def run(served_run, tmp_path_factory):
    """A tiny trained run and a private set of 160 short records by 40 users."""
    root = tmp_path_factory.mktemp("dp")
    torch.set_num_threads(1)
    argv = copy_of(served_run["argv"], root)
    rng = random.Random(0)
    rows = [{"text": f"{rng.choice(NAMES)} has a {rng.choice(['cough', 'fever', 'rash', 'cold'])} on day "
                     f"{rng.randint(1, 28)}.", "user": f"u{i % 40}"} for i in range(160)]
    (root / "private.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, argv + FAST + ["--privacy.data", str(root / "private.jsonl")]


def copy_run(root, name):
    """The same trained run under another name: its own dp_finetune folder."""
    shutil.copytree(root / "served", root / name, ignore=shutil.ignore_patterns("dp_finetune"))
    return ["--run.name", name]


def test_reaches_the_target_epsilon_and_reports_the_utility_cost(run):
    root, argv = run
    report = dp_finetune.main(argv + ["--privacy.target_epsilon=3", "--privacy.epochs=2"])
    assert report == json.loads((root / "served" / "dp_finetune" / "report.json").read_text())
    assert report["epsilon"] == pytest.approx(3.0, abs=0.05) and report["epsilon"] <= 3.0
    assert report["examples"] == 144 and report["held_out_examples"] == 16
    assert report["sample_rate"] == pytest.approx(1 / 9) and report["steps"] == report["planned_steps"] == 18
    assert report["delta"] == 1e-3 and report["max_grad_norm"] == 1.0 and report["noise_multiplier"] > 0.5
    assert report["privacy_unit"].startswith("one record") and report["stopped"] is None
    loss = report["val_loss"]
    # Fine-tuning helps, without DP more than with it: the difference is the utility cost.
    assert loss["non_dp"] < loss["dp"] < loss["base"], loss
    assert report["utility_cost"] == pytest.approx(loss["dp"] - loss["non_dp"], abs=1e-3) and report["utility_cost"] > 0
    model, ckpt = load_model(report["model"])  # a plain checkpoint: the adapters are merged
    assert ckpt.manifest["step"] == 18 and not any("lora" in k for k in model.state_dict())


def test_a_resumed_run_continues_the_accountant(run):
    root, argv = run
    argv = argv + copy_run(root, "resumed") + ["--privacy.target_epsilon=3", "--privacy.epochs=2"]
    first = dp_finetune.main(argv + ["--privacy.stop_after=5"])
    assert first["stopped"] == "stop_after" and first["steps"] == 5 and 0 < first["epsilon"] < 3.0
    second = dp_finetune.main(argv)
    assert second["epsilon_at_start"] == first["epsilon"]        # not reset
    assert second["steps"] == 18 and second["steps_this_run"] == 13
    assert first["epsilon"] < second["epsilon"] == pytest.approx(3.0, abs=0.05)
    assert second["noise_multiplier"] == first["noise_multiplier"]
    third = dp_finetune.main(argv)                               # nothing left to spend: same state
    assert third["steps_this_run"] == 0 and third["epsilon"] == second["epsilon"]
    state = json.loads((root / "resumed" / "dp_finetune" / "state" / "state.json").read_text())
    assert state["privacy"]["history"] == [[second["noise_multiplier"], pytest.approx(1 / 9), 18]]


def test_a_run_asked_to_exceed_its_budget_stops_before_it(run, capsys):
    root, argv = run
    argv = argv + copy_run(root, "budget") + ["--privacy.noise_multiplier=1.0", "--privacy.epochs=3",
                                              "--privacy.target_epsilon=2"]
    report = dp_finetune.main(argv)
    assert report["stopped"] == "budget" and 0 < report["steps"] < report["planned_steps"] == 27
    assert report["epsilon"] <= 2.0
    message = (f"privacy budget: stopped after step {report['steps']} of 27: epsilon {report['epsilon']:.3f} "
               f"is within privacy.target_epsilon=2.0, and step {report['steps'] + 1} would exceed it")
    assert report["message"] == message and message in capsys.readouterr().out
    again = dp_finetune.main(argv)
    assert again["stopped"] == "budget" and again["steps_this_run"] == 0 and again["epsilon"] == report["epsilon"]


def test_user_level_privacy_groups_each_users_records(run):
    root, argv = run
    report = dp_finetune.main(argv + copy_run(root, "users") + ["--privacy.user_field=user", "--privacy.stop_after=1",
                                                               "--privacy.delta=1e-2"])
    assert report["privacy_unit"].startswith("one user") and report["examples"] == 36  # 40 users, 4 held out
    assert report["steps"] == 1


def test_bad_input_is_a_clear_error(run, tmp_path):
    root, argv = run
    with pytest.raises(ValueError, match=r"privacy\.delta=0\.01 must be below 1/N = 0\.00694 \(N = 144 private"):
        dp_finetune.main(argv + ["--privacy.delta=1e-2"])
    with pytest.raises(ValueError, match=r"privacy\.enabled=True needs train\.zero_stage=0 \(got 1\)"):
        dp_finetune.main(argv + ["--train.zero_stage=1"])
    with pytest.raises(ValueError, match=r"privacy\.user_field='account': .* has no such column"):
        dp_finetune.main(argv + ["--privacy.user_field=account"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"privacy\.data=.*: row 2 has no 'text' value"):
        dp_finetune.main(argv + ["--privacy.data", str(bad)])
