"""Online learning: examples and loss masks, the gate, and end to end over HTTP: feedback with
corrections -> one update on a DeepSpeed rank -> gate -> Serve answers with the new version, with
the corrected answers more likely and no request dropped; a failing candidate is not published;
rollback serves the previous version again."""

import json
import math
import threading
import time

import pytest
import requests
import torch

from deepkiln.checkpoint import load_model
from deepkiln.config import load_config
from deepkiln.evaluate import continuation_logprob, pad_rows, sequence_losses
from deepkiln.model import Gate
from deepkiln.testing import free_port, paragraph
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


# -- end to end -------------------------------------------------------------------------------------

PROMPTS = ["The river", "A market", "The doctor wrote", "Summer in the village"]
CORRECTIONS = ["runs past the old mill.", "opens at dawn.", "a letter to the school.", "is long and warm."]


def post(url, path, body):
    return requests.post(url + path, json=body, timeout=120)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_feedback_to_a_served_update_then_a_rejected_candidate_then_rollback(served_copy):
    from ray import serve

    from serve.app import build
    from serve.engine_process import version_of

    tmp_path, argv = served_copy
    argv += ["--quant.format=bf16", "--serve.replica_cpus=0.5", "--online.min_feedback=8", "--online.steps=30",
             "--online.lr=3e-3"]
    cfg = load_config(argv)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(build(cfg), name=MODEL, route_prefix="/")
        first_version = version_of(f"{tmp_path}/served/quantize/bf16")

        # A burst of feedback: every prompt answered, then corrected three times.
        for i, prompt in enumerate(PROMPTS):
            r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200 and r.json()["system_fingerprint"] == first_version
            for k in range(3):
                fb = post(url, "/v1/feedback", {"feedback_id": f"fb-{i}-{k}", "completion_id": r.json()["id"],
                                                "rating": 1, "correction": CORRECTIONS[i]})
                assert fb.status_code == 200, fb.text

        # Requests keep flowing while the update trains and Serve switches versions.
        statuses, fingerprints, stop = [], [], threading.Event()

        def load():
            while not stop.is_set():
                r = post(url, "/v1/completions", {"model": MODEL, "prompt": "The people", "max_tokens": 12})
                statuses.append(r.status_code if r.status_code == 200 else (r.status_code, r.text))
                fingerprints.append(r.json().get("system_fingerprint"))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            report = online.main(argv + ["--once"])
        finally:
            stop.set()
            loader.join()
        assert report["gate"]["passed"] and report["published"], report["gate"]
        assert report["feedback"] == {"examples": 12, "corrected": 12, "rated": 0, "mean_weight": 1.0}
        assert report["mix"] == {"feedback_per_batch": 2, "base_per_batch": 6}
        assert report["loss_last"] < report["loss_first"] and report["buffer"]["unconsumed"] == 0
        assert 0 < report["feedback_to_serving_s"]
        state = json.loads((tmp_path / "served/online/state.json").read_text())
        new_version = version_of(state["versions"]["v0001"]["artifact"])
        assert state["current"] == "v0001" and new_version != first_version
        assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200]  # nothing dropped
        assert first_version in fingerprints
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 8, "temperature": 0})
        assert r.json()["system_fingerprint"] == new_version

        # The corrected answers became more likely, measured here on the two full-precision models.
        tok = Tokenizer.load(tmp_path / "served/tokenizer/tokenizer.model")
        old = load_model(state["versions"]["v0000"]["model"])[0].float()
        new = load_model(state["versions"]["v0001"]["model"])[0].float()
        for prompt, correction in zip(PROMPTS, CORRECTIONS):
            ids, target = tok.encode_prompt(prompt), [*tok.encode(correction), EOS_ID]
            assert continuation_logprob(new, ids, target) > continuation_logprob(old, ids, target) + 1.0
        # The update stepped the routers' balancing bias after its optimizer steps, as pretraining
        # does (the routes it counted were spent on it: the bias moved, and stays zero-mean).
        gates = [(a.bias, b.bias) for a, b in zip(old.modules(), new.modules()) if isinstance(a, Gate)]
        assert gates and all(not torch.equal(a, b) and abs(b.mean().item()) < 1e-6 for a, b in gates)
        assert report["gate"]["candidate"]["feedback_target_loss"] < report["gate"]["current"]["feedback_target_loss"]

        # A candidate trained far too hard fails the gate: kept, not published, the report says why.
        for i, prompt in enumerate(PROMPTS * 2):
            r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0})
            assert post(url, "/v1/feedback", {"feedback_id": f"fb2-{i}", "completion_id": r.json()["id"],
                                              "rating": 2, "correction": "nonsense " * 3}).status_code == 200
        bad = online.main(argv + ["--once", "--online.method=full", "--online.lr=1.0"])
        assert not bad["gate"]["passed"] and not bad["published"] and bad["serving"] == "v0001"
        assert any("held-out perplexity" in reason for reason in bad["gate"]["reasons"])
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 8, "temperature": 0})
        assert r.json()["system_fingerprint"] == new_version

        # Rollback: one command, and the first version answers again.
        assert online.main(argv + ["--rollback"])["serving"] == "v0000"
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "The river", "max_tokens": 8, "temperature": 0})
        assert r.json()["system_fingerprint"] == first_version
        with pytest.raises(ValueError, match="not a version with an artifact"):
            online.main(argv + ["--rollback", "v0002"])  # the rejected candidate has none
    finally:
        serve.shutdown()
