import shutil

import numpy as np

from actors.dedup_index import LshBucketOwner
from actors.shard import ShardOwner
from deepkiln.config import Config
from deepkiln.corpus import list_inputs, plan_shards
from tests.corpus_factory import make_corpus


def owner_for(tmp_path, raw, shard=0, num_shards=2):
    files, _ = list_inputs(str(raw))
    splits = plan_shards(files, 0, num_shards)[shard]
    return ShardOwner(f"shard-{shard}", [s.to_dict() for s in splits], Config().to_dict(), str(tmp_path / "prep"))


def test_restarted_owner_resumes_from_storage_without_reading_input(tmp_path):
    make_corpus(tmp_path / "raw")
    first = owner_for(tmp_path, tmp_path / "raw")
    stats = first.curate()
    assert stats["docs_in"] > 100 and stats["docs_kept"] <= stats["docs_in"]
    shutil.rmtree(tmp_path / "raw")                      # a re-run would now find nothing
    again = ShardOwner(first.name, [s.to_dict() for s in first.splits], Config().to_dict(), str(tmp_path / "prep"))
    assert again.curate() == stats
    assert again.table.equals(first.table)


def test_band_keys_reach_bucket_owners_and_find_cross_shard_duplicates(tmp_path):
    make_corpus(tmp_path / "raw")
    owners = [owner_for(tmp_path, tmp_path / "raw", k) for k in range(2)]
    for o in owners:
        o.curate()
    buckets = [LshBucketOwner(exact_band=Config().data.bands) for _ in range(3)]
    for o in owners:
        for bucket, part in zip(buckets, o.band_keys(3)):
            bucket.add(o.name, part)
    found = [b.pairs([o.name for o in owners]) for b in buckets]
    exact = np.concatenate([f[0] for f in found])
    near = np.concatenate([f[1] for f in found])
    assert len(exact) >= 1 and len(near) >= 2
    shard_ids = [set(o.table.column("id").to_pylist()) for o in owners]
    assert any((a in shard_ids[0]) != (b in shard_ids[0]) for a, b in near.tolist())  # across shards
    ids, sigs = owners[0].signatures(near.ravel())
    assert set(ids.tolist()) <= shard_ids[0] and sigs.shape == (len(ids), Config().data.num_perm)


def test_bucket_owner_refuses_to_answer_with_a_shard_missing():
    import pytest

    bucket = LshBucketOwner(exact_band=20)
    bucket.add("a", (np.zeros(1, np.int32), np.zeros(1, np.uint64), np.zeros(1, np.int64)))
    with pytest.raises(RuntimeError, match=r"missing shards \['b'\]"):
        bucket.pairs(["a", "b"])
