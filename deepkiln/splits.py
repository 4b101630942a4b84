"""Document-level splits and mixtures by deficit sequencing: every choice goes to the part furthest
behind its target share, so at every prefix each part's count is within one of target x length.

    split_of = assign_splits(ids, strata, {"train": 0.98, "validation": 0.01, "test": 0.01}, counts, key)
    order = blend_index({"zh": 0.45, "en": 0.35, "other": 0.2}, n)     # which stratum feeds sample i

Splits: documents are taken in the order of a keyed hash of their id (the representative of their
duplicate cluster: the others were dropped, so a cluster never straddles splits), stratum by stratum,
continuing from the counts earlier generations left; a document keeps its split forever.
"""

from __future__ import annotations

import hashlib

import numpy as np


def split_key(doc_id: int, key: bytes) -> int:
    """A keyed 64-bit hash of a document id: the order in which documents are assigned."""
    return int.from_bytes(hashlib.blake2b(int(doc_id).to_bytes(8, "little", signed=True), key=key,
                                          digest_size=8).digest(), "little")


def next_part(targets: dict[str, float], counts: dict[str, int]) -> str:
    """The part furthest behind its share after one more item (ties: the first listed)."""
    n = sum(counts.get(p, 0) for p in targets) + 1
    return max(targets, key=lambda p: targets[p] * n - counts.get(p, 0))


def assign_splits(ids: list[int], strata: list[str], targets: dict[str, float],
                  counts: dict[str, dict[str, int]], key: bytes) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The split of each document, and the per-stratum counts after them (`counts`: before)."""
    counts = {s: dict(c) for s, c in counts.items()}
    order = sorted(range(len(ids)), key=lambda i: split_key(ids[i], key))
    split = [""] * len(ids)
    for i in order:
        stratum = counts.setdefault(strata[i], {p: 0 for p in targets})
        split[i] = next_part(targets, stratum)
        stratum[split[i]] = stratum.get(split[i], 0) + 1
    return split, counts


def blend_index(weights: dict[str, float], n: int) -> np.ndarray:
    """Which part each of n samples comes from (indices into `weights`' keys), deterministic, each
    part's count within one sample of weight x prefix length at every prefix."""
    total = sum(weights.values())
    targets = {p: w / total for p, w in weights.items()}
    names, counts, out = list(targets), {p: 0 for p in targets}, np.empty(n, dtype=np.int64)
    for i in range(n):
        part = next_part(targets, counts)
        counts[part] += 1
        out[i] = names.index(part)
    return out
