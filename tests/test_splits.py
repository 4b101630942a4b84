"""Document-level splits and the mixture blend index: deficit sequencing keeps every part within one
item of its target at every prefix, and a document's split never moves."""

import random
from collections import Counter

import numpy as np

from deepkiln.splits import assign_splits, blend_index

TARGETS = {"train": 0.8, "validation": 0.1, "test": 0.1}
KEY = b"test-key"


def test_the_blend_index_stays_within_one_sample_of_every_target_at_every_prefix():
    rng = random.Random(0)
    for weights in [{"zh": 0.45, "en": 0.35, "other": 0.2}, {"general": 0.3, "domain": 0.7}] + [
            {f"s{k}": rng.random() for k in range(rng.randint(2, 6))} for _ in range(30)]:
        n = 3000
        index = blend_index(weights, n)
        assert index.tolist() == blend_index(weights, n).tolist()  # deterministic
        share = np.array(list(weights.values())) / sum(weights.values())
        counts = np.cumsum(np.eye(len(weights))[index], axis=0)
        assert np.abs(counts - np.outer(np.arange(1, n + 1), share)).max() < 1, weights


def test_splits_are_disjoint_stratified_within_one_document_and_stable_under_added_files():
    rng = random.Random(1)
    ids = rng.sample(range(10 ** 9), 1200)
    strata = [rng.choice(["zh", "zh", "en", "ja"]) for _ in ids]
    split, counts = assign_splits(ids, strata, TARGETS, {}, KEY)
    assert len(split) == len(ids) and set(split) == set(TARGETS)  # one split per id: none in two
    for stratum, n in Counter(strata).items():
        got = Counter(s for s, t in zip(split, strata) if t == stratum)
        assert counts[stratum] == {p: got[p] for p in TARGETS}
        for part, share in TARGETS.items():
            assert abs(got[part] - share * n) < 1, (stratum, part, got)
    # A second generation: the first keeps its splits (they are stored, never recomputed), the new
    # documents continue each stratum's counts, and the totals stay within one of the targets.
    more = rng.sample(range(10 ** 9, 2 * 10 ** 9), 500)
    more_strata = [rng.choice(["zh", "en", "ko"]) for _ in more]
    more_split, after = assign_splits(more, more_strata, TARGETS, counts, KEY)
    assert assign_splits(ids, strata, TARGETS, {}, KEY)[0] == split  # the same documents: the same splits
    every = Counter(strata + more_strata)
    for stratum, n in every.items():
        assert sum(after[stratum].values()) == n
        for part, share in TARGETS.items():
            assert abs(after[stratum][part] - share * n) < 1, (stratum, part, after[stratum])
    assert more_split != assign_splits(more, more_strata, TARGETS, {}, KEY)[0]  # they did continue the counts
    # The order is a keyed hash of the id: another key, another assignment.
    assert assign_splits(ids, strata, TARGETS, {}, b"other")[0] != split
