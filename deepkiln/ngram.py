"""Model-based quality: an interpolated Kneser-Ney n-gram model over units (lower-cased words; CJK:
one character each) trained on text the user trusts, scoring documents by perplexity, as CCNet
scores web text against Wikipedia, without a download.

    model = KneserNey.fit(trusted_texts, order=3)
    model.perplexity("a document")      # lower: more like the trusted text

Per level k (1..order) the model keeps, for every context of k-1 units, its successors' counts:
raw counts at the top level, continuation counts (how many distinct units precede the k-gram) below
it. P_k(w | h) = max(c(h w) - D, 0) / c(h) + D * types(h) / c(h) * P_{k-1}(w | h minus its first
unit), down to a uniform distribution over the vocabulary and one unknown unit.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

from deepkiln.text import units

BOUNDARY = "\x00"  # the unit before a document's first and after its last


def model_units(text: str, words: list[str] | None = None) -> list[str]:
    """The units a model sees: text.units (or `words`, where the caller has them already), lower-cased."""
    return [u.lower() for u in (units(text) if words is None else words)]


class KneserNey:
    def __init__(self, order: int, discount: float, levels: list[dict[tuple, Counter]], vocab: int):
        self.order, self.discount, self.vocab = order, discount, vocab
        self.levels = levels  # levels[k - 1][context of k - 1 units] = Counter of next units
        self.totals = [{h: sum(c.values()) for h, c in level.items()} for level in levels]

    @classmethod
    def fit(cls, texts: Iterable[str], order: int = 3, discount: float = 0.75) -> KneserNey:
        if order < 1:
            raise ValueError(f"order={order} must be at least 1")
        top, vocab = Counter(), set()
        for text in texts:
            seq = [BOUNDARY] * (order - 1) + model_units(text) + [BOUNDARY]
            vocab.update(seq)
            top.update(tuple(seq[i:i + order]) for i in range(len(seq) - order + 1))
        levels = [defaultdict(Counter) for _ in range(order)]
        for gram, n in top.items():
            levels[order - 1][gram[:-1]][gram[-1]] += n
        for k in range(order - 1, 0, -1):  # continuation counts: distinct left extensions
            for h, successors in levels[k].items():
                for w in successors:
                    levels[k - 1][h[1:]][w] += 1
        return cls(order, discount, [dict(level) for level in levels], len(vocab))

    def prob(self, history: tuple, w: str) -> float:
        p = 1.0 / (self.vocab + 1)
        for k in range(1, self.order + 1):
            h = history[len(history) - k + 1:] if k > 1 else ()
            successors = self.levels[k - 1].get(h)
            if successors is None:
                continue  # an unseen context: its level passes the lower one through
            total = self.totals[k - 1][h]
            p = (max(successors.get(w, 0) - self.discount, 0) + self.discount * len(successors) * p) / total
        return p

    def log_likelihood(self, text: str, words: list[str] | None = None) -> tuple[float, int]:
        """(natural-log probability of the text's units and its end, number of predictions); `words`:
        its text.units, where the caller has them already."""
        seq = [BOUNDARY] * (self.order - 1) + model_units(text, words) + [BOUNDARY]
        n = len(seq) - self.order + 1
        total = sum(math.log(self.prob(tuple(seq[i:i + self.order - 1]), seq[i + self.order - 1])) for i in range(n))
        return total, n

    def perplexity(self, text: str, words: list[str] | None = None) -> float:
        total, n = self.log_likelihood(text, words)
        return math.exp(-total / n)
