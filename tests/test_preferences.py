"""Preference data from feedback records, and the DPO, KTO and Bradley-Terry losses: exact at the
reference, learning on planted pairs, and equal to TRL's trainers on the same exported model and batch."""

from __future__ import annotations

import math
import random

import pytest
import torch

from deepkiln.config import FeedbackArgs, OnlineArgs
from deepkiln.evaluate import IGNORE, pad_rows
from deepkiln.model import PRESETS, Transformer
from deepkiln.preferences import (Label, Pair, bradley_terry_loss, dpo_loss, group_advantages, grpo_loss, kto_loss,
                                  kto_weights, preference_items, ranked_pair, recorded_routes, replayed_routes,
                                  sequence_logps, token_logps)

SCALE, ONLINE = FeedbackArgs(), OnlineArgs()
BETA = 0.1


def rec(rating, completion="served answer", correction=None, prompt="q"):
    return {"prompt": prompt, "completion": completion, "rating": rating, "correction": correction}


def test_ratings_and_thumbs_map_to_labels_and_corrections_to_pairs():
    thumbs = FeedbackArgs(rating_min=0, rating_max=1)
    assert preference_items(rec(5), SCALE, ONLINE) == [Label("q", "served answer", True)]
    assert preference_items(rec(4), SCALE, ONLINE) == [Label("q", "served answer", True)]
    assert preference_items(rec(3), SCALE, ONLINE) == []  # the middle of the scale says nothing
    assert preference_items(rec(2), SCALE, ONLINE) == [Label("q", "served answer", False)]
    assert preference_items(rec(1), thumbs, ONLINE) == [Label("q", "served answer", True)]   # thumbs up
    assert preference_items(rec(0), thumbs, ONLINE) == [Label("q", "served answer", False)]  # thumbs down
    strict = OnlineArgs(desirable_min=5, undesirable_max=1)
    assert [preference_items(rec(r), SCALE, strict) for r in (1, 2, 4, 5)] == [
        [Label("q", "served answer", False)], [], [], [Label("q", "served answer", True)]]
    # A correction: the user's answer over the served one, and the user's answer as a good one; the
    # served answer is labelled by its rating, never desirable once corrected.
    assert preference_items(rec(1, correction="fixed"), SCALE, ONLINE) == [
        Pair("q", "fixed", "served answer", 1.0), Label("q", "fixed", True), Label("q", "served answer", False)]
    assert preference_items(rec(5, correction="fixed"), SCALE, ONLINE) == [
        Pair("q", "fixed", "served answer", 1.0), Label("q", "fixed", True)]
    assert preference_items(rec(3, correction="served answer"), SCALE, ONLINE) == [Label("q", "served answer", True)]


def test_two_ratings_of_one_prompt_rank_a_pair_with_the_rating_gap_as_margin():
    a, b = rec(5, "good"), rec(2, "poor")
    assert ranked_pair(a, b, SCALE) == ranked_pair(b, a, SCALE) == Pair("q", "good", "poor", 0.75)
    assert ranked_pair(a, rec(5, "also good"), SCALE) is None     # equal ratings
    assert ranked_pair(a, rec(1, "good"), SCALE) is None          # the same completion
    assert ranked_pair(a, rec(1, "x", prompt="other"), SCALE) is None


def test_kto_weights_balance_desirable_and_undesirable_mass():
    w_d, w_u = kto_weights(3, 12)
    assert w_d * 3 == w_u * 12 and w_u == 1.0
    assert kto_weights(0, 5) == kto_weights(5, 0) == (1.0, 1.0)


def tiny(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(PRESETS["tiny"].model_copy(update={"vocab_size": 512})).eval()


def pair_rows(pairs):
    """(chosen rows, rejected rows) as (ids, labels): loss on the answer tokens only."""
    def row(p, a):
        return p + a, [IGNORE] * len(p) + a
    return [row(p, c) for p, c, _ in pairs], [row(p, r) for p, _, r in pairs]


def logps(model, rows):
    x, y = pad_rows(rows)
    return sequence_logps(model(x).logits, y)


def planted_pairs(n, seed=0):
    """Prompts of random tokens; the chosen answer repeats tokens 10-19, the rejected one 20-29."""
    rng = random.Random(seed)
    return [([rng.randrange(40, 500) for _ in range(6)], [rng.randrange(10, 20) for _ in range(5)],
             [rng.randrange(20, 30) for _ in range(5)]) for _ in range(n)]


def test_sequence_logps_sum_the_labelled_tokens_only():
    model = tiny(0)
    rows = [([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), ([5, 6, 9], [IGNORE, IGNORE, 9])]
    got = logps(model, rows)
    logits = model(torch.tensor([[5, 6, 7]])).logits[0].log_softmax(-1)
    assert got[0].item() == pytest.approx((logits[1, 7] + logits[2, 8]).item(), abs=1e-5)


def test_dpo_is_ln2_at_the_reference_and_its_margin_grows_on_planted_pairs():
    model, pairs = tiny(0), planted_pairs(8)
    chosen, rejected = pair_rows(pairs)
    with torch.no_grad():
        ref_c, ref_r = logps(model, chosen), logps(model, rejected)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    margins = []
    for step in range(6):
        losses, rc, rr = dpo_loss(logps(model, chosen), logps(model, rejected), ref_c, ref_r, BETA)
        if step == 0:
            # Exactly ln 2 (in float32): the policy is the reference.
            assert torch.equal(losses, torch.full_like(losses, math.log(2)))
            assert rc.abs().max().item() == rr.abs().max().item() == 0.0
        margins.append((rc - rr).mean().item())
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    assert all(b > a for a, b in zip(margins, margins[1:])), margins


def test_bradley_terry_is_ln2_for_equal_rewards_and_the_margin_raises_it():
    r = torch.tensor([0.3, -1.0])
    assert torch.allclose(bradley_terry_loss(r, r), torch.full((2,), math.log(2)))
    assert (bradley_terry_loss(r + 1, r, torch.tensor([0.5, 1.0])) > bradley_terry_loss(r + 1, r)).all()


# -- TRL as the oracle: the same exported model and batch -------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Policy and reference (different weights) as deepkiln models and as transformers models loaded
    from their exported folders, and a tokenizer for TRL's trainers to hold."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    from deepkiln.testing import hf_folder, make_bpe_tokenizer, paragraph

    root = tmp_path_factory.mktemp("trl")
    ours = {name: tiny(seed) for name, seed in (("policy", 1), ("ref", 2))}
    hf = {name: transformers.AutoModelForCausalLM.from_pretrained(hf_folder(m, root / name), dtype=torch.float32)
          for name, m in ours.items()}
    rng = random.Random(0)
    tok_json = make_bpe_tokenizer(root / "tok", [paragraph(rng) for _ in range(50)], 400)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_json.parent))
    return ours, hf, tok, root


def trl_batch(collator, examples):
    return {k: torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
            for k, v in collator.torch_call(examples).items()}


def seq_logps(model, input_ids, completion_mask):
    """deepkiln's log P(completion) of TRL's rows: the targets are the next tokens, scored where
    TRL's completion mask is set."""
    targets = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE)
    return sequence_logps(model(input_ids[:, :-1]).logits, targets)


def test_dpo_loss_equals_trls_on_the_same_exported_model_and_batch(exported):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ours, hf, tok, root = exported
    text = Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 2)
    args = DPOConfig(output_dir=str(root / "dpo"), beta=BETA, report_to="none", per_device_train_batch_size=4,
                     bf16=False, use_cpu=True)
    trainer = DPOTrainer(model=hf["policy"], ref_model=hf["ref"], args=args, train_dataset=text, processing_class=tok)
    rows = planted_pairs(4, seed=3)
    batch = trl_batch(DataCollatorForPreference(pad_token_id=0),
                      [{"prompt_ids": p, "chosen_ids": c + [7], "rejected_ids": r[:3 + i]} for i, (p, c, r)
                       in enumerate(rows)])
    theirs = trainer.compute_loss(trainer.model, batch).item()
    with torch.no_grad():
        pol, ref = (seq_logps(ours[n], batch["input_ids"], batch["completion_mask"]) for n in ("policy", "ref"))
    n = len(rows)
    mine = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], BETA)[0].mean().item()
    assert abs(mine - math.log(2)) > 1e-3  # policy and reference differ: the comparison is not trivial
    assert mine == pytest.approx(theirs, abs=1e-4)


def test_kto_loss_equals_trls_on_the_same_exported_model_and_batch(exported):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    ours, hf, tok, root = exported
    text = Dataset.from_list([{"prompt": "a b", "completion": " c", "label": True},
                              {"prompt": "a b", "completion": " d", "label": False}])
    w_d, w_u = kto_weights(1, 3)
    args = KTOConfig(output_dir=str(root / "kto"), beta=BETA, report_to="none", per_device_train_batch_size=4,
                     bf16=False, use_cpu=True, desirable_weight=w_d, undesirable_weight=w_u)
    trainer = KTOTrainer(model=hf["policy"], ref_model=hf["ref"], args=args, train_dataset=text, processing_class=tok)
    rows = planted_pairs(4, seed=8)  # a batch whose KL estimate is above 0, where it is not clamped
    labels = [True, False, False, False]
    examples = [{"prompt_ids": p, "completion_ids": (c if good else r)[:2 + i], "label": good}
                for i, ((p, c, r), good) in enumerate(zip(rows, labels))]
    # TRL's KL baseline: each prompt with the batch's completions shifted by one.
    for i, e in enumerate(examples):
        e["KL_completion_ids"] = examples[i - 1]["completion_ids"]
    batch = trl_batch(DataCollatorForUnpairedPreference(pad_token_id=0), examples)
    theirs = trainer.compute_loss(trainer.model, batch).item()
    with torch.no_grad():
        main = [seq_logps(ours[n], batch["input_ids"], batch["completion_mask"]) for n in ("policy", "ref")]
        kl = [seq_logps(ours[n], batch["KL_input_ids"], batch["KL_completion_mask"]) for n in ("policy", "ref")]
    losses, _, baseline = kto_loss(main[0], main[1], kl[0], kl[1], torch.tensor(labels), BETA, w_d, w_u)
    assert baseline.item() > 0  # the KL term takes part
    assert losses.mean().item() == pytest.approx(theirs, abs=1e-4)


# -- GRPO -------------------------------------------------------------------------------------------

def test_grpo_advantages_sum_to_zero_in_each_group_and_rank_within_it():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5, -1.0, 4.0, 0.0, 2.0])
    adv = group_advantages(rewards, 4).view(3, 4)
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-5)
    assert adv[0].argsort().tolist() == [0, 1, 2, 3] and torch.equal(adv[1], torch.zeros(4))  # a tie teaches nothing
    with pytest.raises(RuntimeError):
        group_advantages(rewards[:10], 4)  # not whole groups


def test_with_the_rollouts_routes_replayed_the_ratio_is_exactly_one_and_routing_stays_put():
    model = tiny(3)
    rows = [(p + c, [IGNORE] * len(p) + c) for p, c, _ in planted_pairs(6, seed=4)]
    x, y = pad_rows(rows)
    with torch.no_grad(), recorded_routes(model) as routes:  # the rollout's forward (eval mode)
        old = token_logps(model(x).logits, y)
    routes = dict(routes)
    model.train()
    with replayed_routes(routes):  # the first pass of the update: the same policy, the same routes
        logps = token_logps(model(x).logits, y)
    loss, stats = grpo_loss(logps, old, old, torch.ones(len(rows)), y != IGNORE, clip=0.2, kl_coef=0.04)
    assert torch.equal(logps, old) and stats["ratio"].item() == 1.0 and stats["kl"].item() == 0.0
    loss.backward()
    with torch.no_grad():  # the policy moves: its own routing drifts, the replayed one does not
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        with recorded_routes(model) as free:
            model(x)
        with replayed_routes(routes), recorded_routes(model) as replayed:
            model(x)
    assert all(torch.equal(replayed[g], routes[g]) for g in routes)
    assert any(not torch.equal(free[g], routes[g]) for g in routes)


def test_grpo_clips_the_ratio_on_the_side_the_advantage_pushes():
    old = torch.zeros(2, 3)
    logps = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)  # ratios e^0.5, e^-0.5
    mask = torch.tensor([[1, 0, 0], [1, 0, 0]])
    loss, stats = grpo_loss(logps, old, logps.detach(), torch.tensor([1.0, -1.0]), mask, clip=0.2, kl_coef=0.0)
    loss.backward()
    # Both ratios are beyond the clip in the advantage's direction: no gradient flows.
    assert torch.equal(logps.grad, torch.zeros(2, 3)) and stats["clipped"].item() == 1.0
    assert loss.item() == pytest.approx(-(1.2 * 1 + 0.8 * -1) / 2)
