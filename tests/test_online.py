"""Online learning's parts: examples and loss masks, the gate, the preference set. End to end over
HTTP (feedback -> update on a DeepSpeed rank -> gate -> Serve answers with the new version, no
request dropped; a failing candidate not published; rollback) runs in the cluster story,
tests/test_jobs.py."""

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

from deepkiln.checkpoint import load_model, save_checkpoint
from deepkiln.config import QuantArgs, load_config
from deepkiln.evaluate import pad_rows, sequence_losses, windows
from deepkiln.paths import RunPaths
from deepkiln.preferences import encode_answer
from deepkiln.precision import compute_dtype
from deepkiln.quantize import apply_quantization, load_quantized, quantized_layers
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
    ids, labels = encode_answer(tok, {"completion_id": "cmpl-1", "prompt": "The river"}, "is wide", 64)
    prompt, target = [BOS_ID, *tok.encode("The river")], tok.encode("is wide")
    assert ids == prompt + target + [EOS_ID] and labels == [-100] * len(prompt) + target + [EOS_ID]
    chat = {"completion_id": "chatcmpl-1", "prompt": json.dumps([{"role": "user", "content": "Hi"}])}
    ids, labels = encode_answer(tok, chat, "Hello", 64)
    assert ids[:len(ids) - len(tok.encode("Hello")) - 1] == tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert labels[-1] == SPECIAL_TOKENS["<|end|>"] and labels.count(-100) == len(ids) - len(tok.encode("Hello")) - 1
    assert len(encode_answer(tok, chat, "word " * 100, 16)[0]) == 16


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


def preference_rows(method: str, n: int = 6) -> list[dict]:
    """Buffer rows: the same good answer over (or desirable beside) the same bad one, for n prompts."""
    good, bad = "is wide and slow and calm", "road the the road"
    if method == "dpo":
        return [{"completion_id": f"cmpl-{i}", "prompt": f"The river {i}", "chosen": good, "rejected": bad}
                for i in range(n)]
    return [{"completion_id": f"cmpl-{i}", "prompt": f"The river {i}", "chosen": good if i % 2 else bad,
             "desirable": i % 2} for i in range(n)]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_preference_update_starts_at_its_reference_and_widens_the_margin(served_run, tmp_path, method):
    from unittest import mock

    from deepkiln.paths import absolute
    from deepkiln.trainer import as_only_rank
    from deepkiln.update import OnlyRank, update_loop

    cfg = absolute(load_config([*served_run["argv"], f"--online.method={method}", "--online.steps=6",
                                "--online.batch_size=4", "--online.feedback_fraction=0.5"]))
    encoded = online.encode_examples(served_run["tokenizer"], preference_rows(method), method, 64)
    config = {"cfg": cfg.to_dict(), "base": RunPaths.of(cfg).train_model, "update": 1, "examples": encoded,
              "weights": [1.0] * len(encoded), "base_first": 0}
    with mock.patch.dict("os.environ"):  # the rank's variables stay in the rank
        metrics = as_only_rank(update_loop, config, OnlyRank(str(tmp_path / "model")))
    curves = online.preference_figures(metrics)["curves"]
    # At the first step the policy is the reference: every implicit reward is 0, DPO's loss is ln 2,
    # KTO's half the example weights' mean (KL baseline 0).
    assert curves["reward_chosen"][0] == pytest.approx(0, abs=1e-5)
    assert curves["margin"][0] == pytest.approx(0, abs=1e-5)
    if method == "dpo":
        assert curves["preference_loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    margins = [m for m in curves["margin"] if m is not None]
    assert margins[-1] > 0.05, curves
    load_model(tmp_path / "model")  # the merged model is whole


def test_grpo_with_a_rule_reward_makes_the_served_versions_sampled_answers_score_higher(served_run, tmp_path):
    from unittest import mock

    from deepkiln.paths import absolute
    from deepkiln.trainer import as_only_rank
    from deepkiln.update import OnlyRank, sample, score, update_loop

    cfg = absolute(load_config([*served_run["argv"], "--online.method=grpo", "--online.rule_rewards=[short]",
                                "--online.reward_model=", "--online.steps=8", "--online.max_new_tokens=16",
                                "--online.feedback_fraction=1.0", "--online.lr=5e-3"]))
    rows = [{"completion_id": f"cmpl-{i}", "prompt": paragraph(random.Random(i), 4)} for i in range(4)]
    prompts = online.rollout_prompts(served_run["tokenizer"], rows, 64)
    config = {"cfg": cfg.to_dict(), "base": RunPaths.of(cfg).train_model, "update": 1, "examples": prompts,
              "weights": [1.0] * len(prompts), "base_first": 0, "reward_model": None}
    with mock.patch.dict("os.environ"):
        metrics = as_only_rank(update_loop, config, OnlyRank(str(tmp_path / "model")))
    curves = metrics["curves"]
    assert curves["ratio"][0] == 1.0 and curves["clipped"][0] == 0.0  # the first pass on each rollout
    assert len(curves["reward"]) == 8 and all(0 <= r <= 1 for r in curves["reward"])

    def mean_score(artifact):  # as Serve loads and samples it; the same prompts and seeds: 8 answers each
        model = load_quantized(artifact, compute_dtype(cfg.serve.dtype))[0]
        return score(sample(model, prompts, cfg, 8, 1.0, seed=123), cfg, None).mean().item()

    tokenizer = served_run["root"] / "served" / "tokenizer" / "tokenizer.model"
    new = online.quantize_version(cfg, str(tmp_path / "model"), tmp_path / "artifact", str(tokenizer))
    before, after = mean_score(RunPaths.of(cfg).artifact), mean_score(new)
    assert after > before + 0.05, (before, after, curves["reward"])


@pytest.mark.slow
def test_grpo_from_feedback_scored_by_the_newest_reward_model_passes_its_gate(served_copy, ray_local):
    """The driver's side of GRPO: labelled answers in the replay buffer give its prompts, the newest
    reward model (pipelines.reward, from the feedback's pairs) and a rule score the rollouts on a
    one-rank update, the gate samples greedy answers from both artifacts, and the report carries
    the curves (not published: no Serve app here)."""
    import ray

    from actors.replay import replay_buffer
    from pipelines import reward

    _, argv = served_copy
    run = [*argv, "--online.method=grpo", "--online.rule_rewards=[short]", "--online.steps=4",
           "--online.max_new_tokens=8", "--online.min_feedback=4", "--online.publish=false", "--reward.steps=5"]
    cfg = load_config(run)
    rng = random.Random(0)
    records = [{"seq": i + 1, "completion_id": f"cmpl-{i // 2}", "prompt": paragraph(rng, 4) if i % 2 == 0 else None,
                "completion": ["a calm wide river", "road road road road"][i % 2], "rating": [5, 1][i % 2],
                "correction": None, "model_version": "v0000", "created": time.time(), "client": "anonymous"}
               for i in range(8)]
    for i in range(1, 8, 2):
        records[i]["prompt"] = records[i - 1]["prompt"]  # two rated answers of each prompt: a ranked pair
    buffer = replay_buffer(cfg)
    ray.get(buffer.ingest.remote("collector-0", records))
    (Path(served_copy[0]) / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "chosen": "a calm wide river", "rejected": "road road road road"}) + "\n"
        for r in records[::2]))
    made = reward.main([*run, f"--reward.pairs={served_copy[0] / 'pairs.jsonl'}", "--reward.holdout_fraction=0"])
    report = online.run_update(cfg, buffer, online.load_state(cfg))
    assert report["method"] == "grpo" and report["feedback"]["kind"] == "label" and report["feedback"]["examples"] == 8
    verdict = report["gate"]
    assert verdict["passed"], verdict["reasons"]
    assert verdict["candidate"]["sampled_reward"] >= verdict["current"]["sampled_reward"]
    curves = report["curves"]
    assert curves["ratio"][0] == 1.0 and len(curves["reward"]) == 4 and not report["published"]
    assert ray.get(buffer.size.remote("label")) == 0  # consumed
    assert made["version"] == "r0001" and online.reward_model_of(cfg) == made["path"]


def test_the_first_run_needs_the_earlier_stages(tmp_path):
    with pytest.raises(ValueError, match="run pipelines.train and pipelines.quantize first"):
        online.load_state(load_config(["--run.run_dir", str(tmp_path)]))


def test_grpo_without_a_reward_or_with_a_bad_prompt_file_is_refused_before_it_starts(tmp_path):
    run = ["--run.run_dir", str(tmp_path), "--online.method=grpo"]
    with pytest.raises(ValueError, match="online.method=grpo needs a reward: train one with pipelines.reward"):
        online.main([*run, "--once"])
    with pytest.raises(ValueError, match="online.reward_model='nowhere' is not a reward model folder"):
        online.main([*run, "--once", "--online.reward_model=nowhere"])
    (tmp_path / "prompts.jsonl").write_text('plain prompt\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match="online.prompts line 2: field 'prompt' is missing or not text"):
        online.main([*run, "--once", "--online.rule_rewards=[short]", f"--online.prompts={tmp_path / 'prompts.jsonl'}"])


def _candidate(cfg, out, spoil_model=None, spoil_artifact=None) -> str:
    """The run's model quantized to nf4 as an update's candidate, spoilt before or after quantizing."""
    model, ckpt = load_model(RunPaths.of(cfg).train_model)
    if spoil_model:
        spoil_model(model)
    q = QuantArgs(format="nf4")
    model = apply_quantization(model, q)
    if spoil_artifact:
        spoil_artifact(model)
    return str(save_checkpoint(out, model, {**ckpt.config, "quant": q.model_dump()}))


def test_the_gate_judges_the_quantized_artifact_it_would_publish(served_run, tmp_path):
    cfg = load_config([*served_run["argv"], "--quant.format=nf4"])
    paths = RunPaths.of(cfg)
    data = windows(cfg)
    pairs = online.preference_pairs(cfg, served_run["tokenizer"], data)
    encoded = [encode_answer(served_run["tokenizer"], {"completion_id": "cmpl-1", "prompt": "The river"},
                                    "is wide", 64)]

    def judge(candidate):
        return online.judge(cfg, paths.artifact, paths.train_model, candidate, data, pairs, encoded, [])

    fine = judge(_candidate(cfg, tmp_path / "fine"))  # the served artifact's twin passes
    assert fine["passed"] and fine["candidate"]["perplexity"] == pytest.approx(fine["current"]["perplexity"])

    def scramble(model):  # the packed nf4 weights overwritten after quantization
        g = torch.Generator().manual_seed(0)
        for layer in quantized_layers(model).values():
            w = layer.weight
            w.data.copy_(torch.randint(0, 256, w.shape, dtype=torch.uint8, generator=g))

    broken = judge(_candidate(cfg, tmp_path / "broken", spoil_artifact=scramble))
    assert not broken["passed"] and "held-out perplexity" in broken["reasons"][0], broken["reasons"]
    # ...while the same model unquantized passes: only the artifact's figures can catch it.
    assert online.gate(cfg, broken["current"], broken["candidate_unquantized"])["passed"]

    nan = judge(_candidate(cfg, tmp_path / "nan", spoil_model=lambda m: next(
        p for n, p in m.named_parameters() if n.startswith("layers.0.")).data.fill_(float("nan"))))
    assert not nan["passed"] and any("not a finite number" in r for r in nan["reasons"]), nan["reasons"]


def test_pruning_keeps_the_served_version_the_rollback_targets_and_the_newest(tmp_path):
    cfg = load_config(["--run.run_dir", str(tmp_path), "--run.name", "r", "--online.keep_versions=2"])
    paths = RunPaths.of(cfg)
    names = [f"v{i:04d}" for i in range(1, 9)]
    state = {"current": "v0003", "history": ["v0000", "v0001", "v0003", "v0002", "v0003"], "updates": 8,
             "publishing": "v0005", "versions": {"v0000": {"model": "train/model", "artifact": "quantize/bf16"}}}
    for name in names:
        Path(paths.version(name), "model").mkdir(parents=True)
        state["versions"][name] = {"model": f"{paths.version(name)}/model", "artifact": f"{paths.version(name)}/a",
                                   "gate": {"passed": True}}
    Path(paths.online_state).parent.mkdir(parents=True, exist_ok=True)
    pruned = online.prune(cfg, state)
    # kept: served v0003, the last two served (v0002, v0003), one being published (v0005), the newest two (v0007, v0008)
    assert pruned == ["v0001", "v0004", "v0006"]
    assert sorted(p.name for p in Path(paths.version("v0001")).parent.iterdir()) == ["v0002", "v0003", "v0005", "v0007", "v0008"]
    saved = json.loads(Path(paths.online_state).read_text())
    assert saved["versions"]["v0001"] == {"model": None, "artifact": None, "gate": {"passed": True}, "pruned": True}
    assert online.prune(cfg, saved) == []  # nothing more to do
    saved.pop("publishing")
    online.save_state(cfg, saved)
    with pytest.raises(ValueError, match="--rollback v0001: not a kept version"):
        online.rollback(cfg, "v0001")


@pytest.mark.slow
def test_an_update_whose_rank_is_killed_half_way_is_run_again_to_the_end(served_run, served_copy, ray_local):
    """An update of one rank (online.num_workers=1) trains in a Ray task: SIGKILLed after half its
    steps, Ray runs it again, and the update ends with every step and a merged model that loads."""
    _, argv = served_copy
    cfg = load_config([*argv, "--online.steps=4"])
    tok = served_run["tokenizer"]
    encoded = [encode_answer(tok, {"completion_id": "cmpl-1", "prompt": "The river"}, "is wide", 64)]
    ray_local.unlink()  # arm: the rank kills itself once, after step 2
    try:
        metrics, model_dir = online.train_update(cfg, RunPaths.of(cfg).train_model, encoded, [1.0], update=1,
                                                 base_first=0)
        assert ray_local.exists()  # the kill happened (the killed rank disarmed it)
    finally:
        ray_local.touch()  # disarmed whatever happened: no later test's process is killed by it
    assert metrics["ranks"] == 1 and len(metrics["losses"]) == 4 and all(math.isfinite(x) for x in metrics["losses"])
    model, ckpt = load_model(model_dir)
    assert ckpt.config["online"]["steps"] == 4 and sum(p.numel() for p in model.parameters()) > 0
