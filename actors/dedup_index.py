"""LshBucketOwner: owns a slice of the LSH band space (keys k with k mod n_owners == its index)
and turns the (band, key, doc id) triples that every ShardOwner sends into candidate pairs: exact
hashes, MinHash LSH bands and SimHash blocked-search tables, each kind paired apart.

Its state is a pure function of the shards' signatures, so after a restart the driver just sends
them again: `pairs` refuses to answer until every expected shard has been added.
"""

from __future__ import annotations

import numpy as np
import ray

from deepkiln.dedup import bucket_pairs


class LshBucketOwner:
    def __init__(self, exact_band: int):
        self.exact_band = exact_band  # the band index that carries exact hashes
        self.parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(self, shard: str, part: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        """Store one shard's triples (replacing any earlier copy, so retries are harmless)."""
        self.parts[shard] = part
        return len(part[2])

    def pairs(self, shards: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(exact pairs, MinHash candidate pairs, SimHash candidate pairs) across every shard, each
        (K, 2) int64: bands below the exact band are MinHash's, those above it SimHash's tables."""
        missing = sorted(set(shards) - set(self.parts))
        if missing:
            raise RuntimeError(f"bucket owner is missing shards {missing} (restarted?); add them again")
        band, key, ids = (np.concatenate([self.parts[s][i] for s in shards]) for i in range(3))
        kinds = (band == self.exact_band, band < self.exact_band, band > self.exact_band)
        return tuple(bucket_pairs(band[k], key[k], ids[k]) for k in kinds)


LshBucketOwnerActor = ray.remote(max_restarts=-1, max_task_retries=-1)(LshBucketOwner)
