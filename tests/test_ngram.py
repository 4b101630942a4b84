"""The Kneser-Ney reference model behind model-based quality: a distribution, and a ranking that
puts real text above the same words shuffled and above random characters."""

import random

import pyarrow.parquet as pq
import pytest

from deepkiln.ngram import BOUNDARY, KneserNey, model_units
from tests.corpus_factory import en_doc, zh_doc

def test_probabilities_sum_to_one_in_every_context():
    model = KneserNey.fit(["the cat sat on the mat", "the dog sat on the log", "猫坐在垫子上"], order=3)
    vocab = {u for t in ["the cat sat on the mat", "the dog sat on the log", "猫坐在垫子上"] for u in model_units(t)}
    for history in [("the", "cat"), ("on", "the"), ("never", "seen"), (BOUNDARY, BOUNDARY), ("坐", "在")]:
        total = sum(model.prob(history, w) for w in vocab | {BOUNDARY}) + model.prob(history, "unseen-unit")
        assert total == pytest.approx(1.0, abs=1e-9), history
    assert model.prob(("sat", "on"), "the") > model.prob(("sat", "on"), "cat") > model.prob(("sat", "on"), "zebra")
    assert model_units("Hello, 世界 World") == ["hello", "世", "界", "world"]
    with pytest.raises(ValueError, match="order=0"):
        KneserNey.fit(["x"], order=0)


@pytest.mark.parametrize("make, joiner", [(zh_doc, ""), (en_doc, " ")], ids=["zh", "en"])
def test_real_text_scores_below_shuffled_words_and_random_characters(make, joiner):
    rng = random.Random(0)
    model = KneserNey.fit([make(rng)[0] for _ in range(400)], order=3)
    held_out = [make(rng) for _ in range(200)]
    chars = sorted({c for text, _ in held_out for c in text if not c.isspace()})
    beats_shuffled = beats_random = 0
    for text, words in held_out:
        shuffled = words[:]
        rng.shuffle(shuffled)
        noise = "".join(rng.choice(chars) for _ in text)
        real = model.perplexity(text)
        beats_shuffled += real < model.perplexity(joiner.join(shuffled))
        beats_random += real < model.perplexity(noise)
    assert beats_shuffled >= 0.95 * len(held_out) and beats_random >= 0.95 * len(held_out)


@pytest.mark.slow  # the built-in corpus's prepare and tokenizer stages, on Ray
def test_real_english_documentation_scores_below_its_words_shuffled(builtin_run):
    """Python's documentation (the built-in corpus, prepared): trained on some documents, scored on others."""
    texts = [t for shard in sorted((builtin_run["root"] / "prepare" / "shards").glob("*.parquet"))
             for t in pq.read_table(shard, columns=["text"]).column("text").to_pylist()]
    rng = random.Random(1)
    rng.shuffle(texts)
    model = KneserNey.fit(texts[:1500], order=3)
    held_out = [t for t in texts[1500:] if len(t.split()) >= 30][:150]
    wins = 0
    for text in held_out:
        words = text.split()
        rng.shuffle(words)
        wins += model.perplexity(text) < model.perplexity(" ".join(words))
    assert len(held_out) == 150 and wins >= 0.95 * len(held_out)
