"""Online learning's parts: examples and loss masks, the gate, the preference set. End to end over
HTTP (feedback -> update on a DeepSpeed rank -> gate -> Serve answers with the new version, no
request dropped; a failing candidate not published; rollback) runs in the cluster story,
tests/test_jobs.py."""

import json
import math

import pytest
import torch

from deepkiln.config import load_config
from deepkiln.evaluate import pad_rows, sequence_losses
from deepkiln.testing import paragraph
from deepkiln.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, Tokenizer
from pipelines import online

MODEL = "deepkiln"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    import random

    from deepkiln.tokenizer import train_tokenizer

    rng = random.Random(0)
    return Tokenizer(train_tokenizer([paragraph(rng, 30) for _ in range(200)], 512))


def test_examples_label_only_the_answer_and_its_stop(tok):
    ids, labels = online.encode_example(tok, {"completion_id": "cmpl-1", "prompt": "The river", "target": "is wide"}, 64)
    prompt, target = [BOS_ID, *tok.encode("The river")], tok.encode("is wide")
    assert ids == prompt + target + [EOS_ID] and labels == [-100] * len(prompt) + target + [EOS_ID]
    chat = {"completion_id": "chatcmpl-1", "prompt": json.dumps([{"role": "user", "content": "Hi"}]), "target": "Hello"}
    ids, labels = online.encode_example(tok, chat, 64)
    assert ids[:len(ids) - len(tok.encode("Hello")) - 1] == tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert labels[-1] == SPECIAL_TOKENS["<|end|>"] and labels.count(-100) == len(ids) - len(tok.encode("Hello")) - 1
    assert len(online.encode_example(tok, {**chat, "target": "word " * 100}, 16)[0]) == 16


def test_each_sequence_counts_once_whatever_its_length():
    x, y = pad_rows([([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]), ([1, 2, 3], [-100, -100, 3])])
    assert x.shape == y.shape == (2, 7) and y[1].tolist() == [-100, 3] + [-100] * 5
    logits = torch.zeros(2, 7, 10)
    logits[1, 1, 3] = 5.0  # the short sequence's one target, predicted well
    per_seq = sequence_losses(logits, y)
    assert per_seq[0] == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=1e-5)
    assert per_seq[1] == pytest.approx(math.log(1 + 9 * math.exp(-5)), rel=1e-5)  # its one target alone


def test_the_gate_names_each_regression():
    cfg = load_config(["--online.max_ppl_increase=0.1", "--online.max_preference_drop=0.05"])
    cur = {"perplexity": 10.0, "preference_accuracy": 0.8, "feedback_target_loss": 3.0}
    assert online.gate(cfg, cur, {**cur, "perplexity": 10.9, "preference_accuracy": 0.76})["passed"]
    bad = online.gate(cfg, cur, {**cur, "perplexity": 11.5, "preference_accuracy": 0.7})
    assert not bad["passed"] and len(bad["reasons"]) == 2
    assert "perplexity 11.500 exceeds 11.000" in bad["reasons"][0] and "0.700 is below 0.750" in bad["reasons"][1]


def test_a_user_preference_set_is_read_and_a_bad_line_is_named(tok, tmp_path):
    good = tmp_path / "prefs.jsonl"
    good.write_text(json.dumps({"prompt": "The river", "chosen": "is wide", "rejected": "wide is"}) + "\n")
    cfg = load_config([f"--online.preference_set={good}"])
    [(prompt, chosen, rejected)] = online.preference_pairs(cfg, tok, data=None)
    assert prompt == [BOS_ID, *tok.encode("The river")] and chosen[-1] == rejected[-1] == EOS_ID
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'rejected'"):
        online.preference_pairs(load_config([f"--online.preference_set={bad}"]), tok, data=None)


def test_the_first_run_needs_the_earlier_stages(tmp_path):
    with pytest.raises(ValueError, match="run pipelines.train and pipelines.quantize first"):
        online.load_state(load_config(["--run.run_dir", str(tmp_path)]))
