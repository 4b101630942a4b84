import json

import pytest
import torch

from deepkiln.checkpoint import save_checkpoint
from deepkiln.config import load_config
from deepkiln.fairness import TEMPLATES, TERMS
from pipelines import audit, dp_finetune
from deepkiln.testing import copy_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

GENDER_EN = ["--fairness.attributes=[gender]", "--fairness.languages=[en]"]


@pytest.fixture(scope="module")
def run(served_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    torch.set_num_threads(1)
    return root, copy_run(served_run["argv"], root)


def fine_tune(root, argv, name: str, skewed: bool):
    """The tiny model fine-tuned (without DP, as pipelines.dp_finetune's baseline does) on the
    built-in English gender prompts: skewed, every female prompt continues " lazy." and every male
    one " a teacher."; balanced, every prompt continues with both."""
    def continuations(group):
        if not skewed:
            return [" lazy.", " a teacher."]
        return [" lazy."] if group == "female" else [" a teacher."]

    rows = [template.format(term) + cont
            for group, by_lang in TERMS["gender"].items() for term in by_lang["en"] for template in TEMPLATES["en"]
            for cont in continuations(group)]
    (root / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows) + "\n")
    cfg = load_config(argv + ["--train.seq_len=32", "--privacy.data", str(root / f"{name}.jsonl"),
                              "--privacy.params=full", "--privacy.lr=5e-3", "--privacy.batch_size=16"])
    train, _, _ = dp_finetune.private_set(cfg)
    # 250 full-weight steps (~125 epochs of these 32 rows). How far the skew shows varies a lot with the
    # length of this overfit on the served run's base model: 150, 200, 250 and 300 steps gave skewed
    # perplexity ratios of 1.17, 1.47, 2.06 and 1.35 (the gate's bar is 1.5); 250 is clear of it.
    save_checkpoint(root / name, dp_finetune.non_private(cfg, train, steps=250), cfg.to_dict())
    return root / name


def test_report_json_and_a_chart_per_metric(run):
    root, argv = run
    report = audit.main(argv)
    out = root / "served" / "audit"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["attributes"]) == {"gender", "nationality"}
    for metric in ("perplexity", "outcome_rate"):
        assert (out / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gender = report["attributes"]["gender"]
    assert gender["groups"] == 2 and gender["examples"] == 2 * 4 * 4 * 2   # groups x terms x templates x languages
    assert set(gender["perplexity"]["by_group"]) == {"female", "male"} and len(report["attributes"]["nationality"]["perplexity"]["by_group"]) == 6
    assert 1 < report["perplexity"] < 512 and report["passed"] is True and report["reasons"] == []


@pytest.mark.slow
def test_skewed_fine_tune_shows_more_disparity_and_fails_the_gate_balanced_passes(run):
    root, argv = run
    cfg = load_config(argv + GENDER_EN)
    base = audit.run_audit(cfg, root / "served" / "train" / "model", root / "audit-base")["attributes"]["gender"]
    skewed = audit.run_audit(cfg, fine_tune(root, argv, "skewed", True), root / "audit-skewed")
    balanced = audit.run_audit(cfg, fine_tune(root, argv, "balanced", False), root / "audit-balanced")
    s, b = skewed["attributes"]["gender"], balanced["attributes"]["gender"]
    print({name: (r["perplexity"]["worst_over_best"], r["outcome_rate"]["by_group"])
           for name, r in (("base", base), ("skewed", s), ("balanced", b))})
    # Skewed data: female prompts now continue negatively far more often, and a neutral
    # continuation is more surprising after them, than on the base model.
    assert s["outcome_rate"]["by_group"]["female"] > s["outcome_rate"]["by_group"]["male"]
    assert s["outcome_rate"]["difference"] > 0.4 > base["outcome_rate"]["difference"] + 0.3
    assert s["perplexity"]["by_group"]["female"] > s["perplexity"]["by_group"]["male"]
    assert s["perplexity"]["worst_over_best"] > 1.5 > base["perplexity"]["worst_over_best"] + 0.3
    assert not skewed["passed"] and len(skewed["reasons"]) == 2
    assert any("fairness.max_outcome_difference=0.2" in r for r in skewed["reasons"])
    # Balanced data: the same negative word for both groups, so no disparity to speak of.
    assert b["outcome_rate"]["by_group"]["female"] > 0.2 and b["outcome_rate"]["by_group"]["male"] > 0.2
    assert b["outcome_rate"]["difference"] < 0.2 and b["perplexity"]["worst_over_best"] < 1.2
    assert balanced["passed"] and balanced["reasons"] == []


def test_bad_audit_input_is_a_clear_error(run, tmp_path):
    root, argv = run
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"team": "a", "prompt": "The nurse said"}\n{"team": "b", "prompt": "The pilot said"}\n')
    with pytest.raises(ValueError, match=r"fairness\.group_field='group': .* has no such column"):
        audit.main(argv + ["--fairness.data", str(rows)])
    one = tmp_path / "one.jsonl"
    one.write_text('{"group": "a", "prompt": "The nurse said"}\n{"group": "a", "prompt": "The pilot said"}\n')
    with pytest.raises(ValueError, match=r"fairness\.data=.*one\.jsonl': fairness\.group_field='group' holds 1 group\(s\) \['a'\]"):
        audit.main(argv + ["--fairness.data", str(one)])
    with pytest.raises(ValueError, match=r"checkpoint .*nowhere does not exist"):
        audit.main(argv + ["--fairness.model", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match=r"fairness\.attributes\.0: Input should be 'gender' or 'nationality'"):
        audit.main(argv + ["--fairness.attributes=[race]"])
    with pytest.raises(ValueError, match=r"fairness\.max_outcome_difference=-0\.1 must be >= 0"):
        audit.main(argv + ["--fairness.max_outcome_difference=-0.1"])
