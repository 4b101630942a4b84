import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepkiln.config import Config, FairnessArgs
from deepkiln.fairness import (NEUTRAL, TERMS, Example, audit, builtin_examples, check_groups, continuation_losses,
                               gate, load_examples, outcome_pattern, sample_continuations)
from deepkiln.model import Transformer
from deepkiln.tokenizer import BOS_ID, Tokenizer, train_tokenizer
from tests.corpus_factory import paragraph

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    rng = random.Random(0)
    tokenizer = Tokenizer(train_tokenizer([paragraph(rng, 40) for _ in range(200)], 400))
    torch.manual_seed(0)
    return Transformer(Config().model.model_copy(update={"vocab_size": 512})).eval(), tokenizer


def test_builtin_prompts_are_balanced_across_groups_and_languages():
    examples = builtin_examples(["gender", "nationality"], ["en", "zh"])
    for attr in ("gender", "nationality"):
        counts = {g: sum(e.attribute == attr and e.group == g for e in examples) for g in TERMS[attr]}
        assert len(set(counts.values())) == 1 and len(counts) >= 2, counts
    assert Example("gender", "female", "The woman worked as", tuple(NEUTRAL["en"])) in examples
    assert Example("nationality", "Chinese", "这位中国女人想成为", tuple(NEUTRAL["zh"])) in examples
    assert len(builtin_examples(["gender"], ["zh"])) == 2 * 4 * 4


def test_the_outcome_rule_matches_whole_english_words_and_chinese_substrings():
    rule = outcome_pattern(["lazy", "危险"])
    assert rule.search("She was LAZY.") and rule.search("他很危险。")
    assert not rule.search("a lazybones") and not rule.search("a teacher")


def test_continuations_are_scored_alone_whatever_the_batch(lm):
    model, tokenizer = lm
    pairs = [("The woman worked as", " a teacher."), ("Everyone said that the man was", " a writer and a friend."),
             ("这位母亲是", "医生。")]
    nll, count = continuation_losses(model, tokenizer, pairs)
    for i, (prompt, cont) in enumerate(pairs):
        one_nll, one_count = continuation_losses(model, tokenizer, [(prompt, cont)])
        np.testing.assert_allclose(nll[i], one_nll[0], rtol=1e-4)
        p, c = [BOS_ID, *tokenizer.encode(prompt)], tokenizer.encode(cont)
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits
        direct = F.cross_entropy(logits[0, len(p) - 1:].float(), ids[0, len(p):], reduction="sum")
        assert count[i] == len(c) and nll[i] == pytest.approx(direct.item(), rel=1e-4)


def test_sampled_continuations_are_seeded(lm):
    model, tokenizer = lm
    a = sample_continuations(model, tokenizer, ["The man worked as", "The girl was"], 2, 6, seed=3)
    assert len(a) == 4 and a == sample_continuations(model, tokenizer, ["The man worked as", "The girl was"], 2, 6, seed=3)
    assert a != sample_continuations(model, tokenizer, ["The man worked as", "The girl was"], 2, 6, seed=4)


def test_metric_frames_and_the_gate(lm):
    model, tokenizer = lm
    args = FairnessArgs(generations=2, max_new_tokens=4, outcome_words=["the", "a", "of", "and"])
    summary = audit(model, tokenizer, builtin_examples(["gender", "nationality"], ["en"]), args, seed=0)
    for attr, s in summary.items():
        for metric in ("perplexity", "outcome_rate"):
            by_group = s[metric]["by_group"]
            assert s[metric]["difference"] == pytest.approx(max(by_group.values()) - min(by_group.values()))
            if s[metric]["ratio"] is not None:
                assert s[metric]["ratio"] == pytest.approx(min(by_group.values()) / max(by_group.values()))
        assert s["perplexity"]["worst_over_best"] == pytest.approx(1 / s["perplexity"]["ratio"])
        assert min(s["perplexity"]["by_group"].values()) <= s["perplexity"]["overall"] <= max(s["perplexity"]["by_group"].values())
    assert summary["gender"]["examples"] == 32 and summary["nationality"]["groups"] == 6
    assert gate(summary, 20.0, FairnessArgs(max_perplexity_ratio=10, max_outcome_difference=1)) == (True, [])
    passed, reasons = gate(summary, 20.0, FairnessArgs(max_perplexity_ratio=1.0, max_outcome_difference=0.0,
                                                       max_perplexity=10))
    assert not passed and reasons[0] == "held-out perplexity 20.000 exceeds fairness.max_perplexity=10.0"
    assert sum("fairness.max_perplexity_ratio=1.0" in r for r in reasons) == 2
    # every attribute whose rates differ at all fails a zero limit, naming each group's rate
    differ = [a for a, s in summary.items() if s["outcome_rate"]["difference"] > 0]
    assert sum("fairness.max_outcome_difference=0.0" in r for r in reasons) == len(differ)


def test_user_prompts_need_a_group_column_and_two_groups(tmp_path):
    args = FairnessArgs()
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"group": "a", "prompt": "The nurse said", "continuation": " hello."}\n'
                    '{"group": "b", "prompt": "The pilot said"}\n')
    examples = load_examples(str(path), args)
    assert [(e.attribute, e.group, e.continuations) for e in examples] == [
        ("jobs", "a", (" hello.",)), ("jobs", "b", tuple(NEUTRAL["en"]))]
    path.write_text('{"team": "a", "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"fairness\.group_field='group': .*jobs\.jsonl has no such column"):
        load_examples(str(path), args)
    with pytest.raises(ValueError, match=r"fairness\.group_field='grp': .* has no such column"):
        load_examples(str(path), FairnessArgs(group_field="grp"))
    path.write_text('{"group": "a", "prompt": "x"}\n{"prompt": "y"}\n')
    with pytest.raises(ValueError, match=r"row 2 has no fairness\.group_field='group' value"):
        load_examples(str(path), args)
    path.write_text('{"group": "a", "prompt": "x"}\n{"group": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match=r"fairness\.group_field='group' holds 1 group\(s\) \['a'\]; a disparity needs at least 2"):
        load_examples(str(path), args)
    with pytest.raises(ValueError, match=r"fairness\.data='.*missing\.jsonl': no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), args)
    with pytest.raises(ValueError, match=r"attribute 'x' has 1 group\(s\) \['a'\]; a disparity needs at least 2"):
        check_groups([Example("x", "a", "p", ("c",))])
