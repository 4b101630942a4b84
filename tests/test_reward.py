"""pipelines.reward: a reward model learns a planted preference (held-out pair accuracy), reads the
run's feedback stores, and refuses data it cannot train on, naming the field."""

import json
import random

import pytest
import torch

from deepkiln.preferences import load_reward, reward_inputs
from deepkiln.testing import paragraph
from pipelines import reward


def planted(path, n: int, seed: int = 0) -> None:
    """Pairs where one style always wins: the answer that thanks over the same answer that refuses."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            answer = paragraph(rng, 9)
            f.write(json.dumps({"prompt": paragraph(rng, 6), "chosen": f"{answer} Thank you, friend.",
                                "rejected": f"{answer} No, go away."}) + "\n")


def test_a_reward_model_learns_the_preferred_style_on_held_out_prompts(served_copy, tmp_path):
    _, argv = served_copy
    planted(tmp_path / "pairs.jsonl", 150)
    report = reward.main([*argv, f"--reward.pairs={tmp_path / 'pairs.jsonl'}", "--reward.steps=40",
                          "--reward.lr=3e-4"])
    assert report["pairs"]["heldout"] >= 20 and report["heldout_pair_accuracy"] >= 0.9, report
    assert report["version"] == "r0001" and report["loss_last"] < report["loss_first"]
    model, _ = load_reward(report["path"])  # the version loads whole and scores as it was measured
    tok = reward.load_tokenizer(report["path"] + "/tokenizer.model")
    good, bad = ([*tok.encode_prompt("The river"), *tok.encode(f"is wide. {end}")]
                 for end in ("Thank you, friend.", "No, go away."))
    with torch.no_grad():
        scores = model(*reward_inputs([good, bad]))
    assert scores[0] > scores[1]
    again = reward.main([*argv, f"--reward.pairs={tmp_path / 'pairs.jsonl'}", "--reward.steps=1"])
    assert again["version"] == "r0002"  # a new version, the first one kept


def test_pairs_a_reward_model_cannot_use_are_refused_by_line_and_field(served_copy, tmp_path):
    _, argv = served_copy
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'rejected'"):
        reward.main([*argv, f"--reward.pairs={bad}"])
    bad.write_text("\n" + '{"prompt": "p", "chosen": ' + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        reward.main([*argv, f"--reward.pairs={bad}"])
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}) + "\n")
    with pytest.raises(ValueError, match="margin=-1 must be a number >= 0"):
        reward.main([*argv, f"--reward.pairs={bad}"])
    with pytest.raises(ValueError, match="no preference pair to train on"):
        reward.main(argv)  # no feedback yet, no pairs of the user's
    with pytest.raises(ValueError, match="run pipelines.train and pipelines.quantize first"):
        reward.main(["--run.run_dir", str(tmp_path / "nothing")])


def test_the_feedback_stores_give_correction_and_ranked_pairs_and_labels(served_copy):
    from actors.feedback import FeedbackCollector
    from deepkiln.config import load_config
    from deepkiln.paths import RunPaths
    from deepkiln.preferences import Label, Pair

    _, argv = served_copy
    cfg = load_config(argv)
    store = FeedbackCollector(RunPaths.of(cfg).collector_db(0))
    for cid, answer in (("cmpl-a", "a calm river"), ("cmpl-b", "road road road"), ("cmpl-c", "so so")):
        store.remember(cid, "The river", answer, "v0000")
    for fid, cid, rating, correction in (("f1", "cmpl-a", 5, None), ("f2", "cmpl-b", "down", None),
                                         ("f3", "cmpl-c", 3, "runs east")):
        store.submit({"feedback_id": fid, "completion_id": cid, "rating": rating, "correction": correction})
    items = {item for item, _ in reward.feedback_items(cfg)}
    assert items == {Label("The river", "a calm river", True), Label("The river", "road road road", False),
                     Pair("The river", "runs east", "so so", 1.0), Label("The river", "runs east", True),
                     Pair("The river", "a calm river", "road road road", 1.0),
                     Pair("The river", "a calm river", "so so", 0.5), Pair("The river", "so so", "road road road", 0.5)}
