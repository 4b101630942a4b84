"""Document-level splits and mixtures by deficit sequencing: every choice goes to the part furthest
behind its target share, so at every prefix each part's count is within one of target x length.

    split_of = assign_splits(ids, strata, {"train": 0.98, "validation": 0.01, "test": 0.01}, counts, key)
    order = blend_index({"zh": 0.45, "en": 0.35, "other": 0.2}, n)     # which stratum feeds sample i
    part, ordinal = Blend(weights).at(i)       # the same, computed only as far as asked, for resumes

Splits: documents are taken in the order of a keyed hash of their id (the representative of their
duplicate cluster: the others were dropped, so a cluster never straddles splits), stratum by stratum,
continuing from the counts earlier generations left; a document keeps its split forever.
"""

from __future__ import annotations

import fnmatch
import hashlib

import numpy as np

OTHER = "other"  # the mixture key that takes every document no other key names


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


def source_file(source: str) -> str:
    """The file a document came from: its `source` ("<file>:<record>") without the record."""
    return source.rsplit(":", 1)[0]


def stratum_of(label: str, keys: list[str]) -> str | None:
    """The first mixture key that names `label` (equal, or a glob matching it: "zh", "wiki/*"),
    else "other" where that key exists, else None (the document is left out)."""
    for key in keys:
        if key != OTHER and (label == key or fnmatch.fnmatchcase(label, key)):
            return key
    return OTHER if OTHER in keys else None


class Blend:
    """blend_index(weights, n) for every n at once, computed only as far as asked: a resumed run
    asks for sample i without the caller knowing n. Deficit sequencing is online (each choice
    depends only on the counts before it), so every prefix is the same as a shorter run's."""

    def __init__(self, weights: dict[str, float]):
        total = sum(weights.values())
        self.names = list(weights)
        self.targets = {p: w / total for p, w in weights.items()}
        self.counts = {p: 0 for p in weights}
        self.parts: list[int] = []     # sample i's part (an index into names)
        self.ordinals: list[int] = []  # how many samples of that part came before it

    def _extend(self, n: int) -> None:
        index = {p: k for k, p in enumerate(self.names)}
        while len(self.parts) < n:
            part = next_part(self.targets, self.counts)
            self.parts.append(index[part])
            self.ordinals.append(self.counts[part])
            self.counts[part] += 1

    def at(self, i: int) -> tuple[int, int]:
        """(part, ordinal within that part) of sample i."""
        if i >= len(self.parts):
            self._extend(max(i + 1, 2 * len(self.parts)))
        return self.parts[i], self.ordinals[i]


def blend_index(weights: dict[str, float], n: int) -> np.ndarray:
    """Which part each of n samples comes from (indices into `weights`' keys), deterministic, each
    part's count within one sample of weight x prefix length at every prefix."""
    blend = Blend(weights)
    blend._extend(n)
    return np.array(blend.parts[:n], dtype=np.int64)


def blend_finite(weights: dict[str, float], available: dict[str, int]) -> list[tuple[str, int]]:
    """Every item of finitely many, (part, ordinal) in blend order: each next item goes to the part
    furthest behind its share among those not yet used up, so every prefix is as near the mixture
    as the parts' sizes allow (held-out windows: any first batches are a fair sample)."""
    counts, out = {p: 0 for p in weights}, []
    live = [p for p in weights if available.get(p, 0) > 0]
    while live:
        total = sum(weights[p] for p in live)
        targets = {p: weights[p] / total for p in live}
        while all(counts[p] < available[p] for p in live):
            part = next_part(targets, counts)  # counts of used-up parts don't count: n is the live ones'
            out.append((part, counts[part]))
            counts[part] += 1
        live = [p for p in live if counts[p] < available[p]]
    return out
