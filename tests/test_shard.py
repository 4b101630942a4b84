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
    exact, near, near_simhash = (np.concatenate([f[k] for f in found]) for k in range(3))
    assert len(exact) >= 1 and len(near) >= 2 and len(near_simhash) >= 1
    shard_ids = [set(o.table.column("id").to_pylist()) for o in owners]
    assert any((a in shard_ids[0]) != (b in shard_ids[0]) for a, b in near.tolist())  # across shards
    ids, sigs, fingerprints, shingles = owners[0].signatures(near.ravel())
    assert set(ids.tolist()) <= shard_ids[0] and sigs.shape == (len(ids), Config().data.num_perm)
    assert fingerprints.dtype == np.uint64 and (shingles > 0).all() and len(fingerprints) == len(ids)


def test_bucket_owner_refuses_to_answer_with_a_shard_missing():
    import pytest

    bucket = LshBucketOwner(exact_band=20)
    bucket.add("a", (np.zeros(1, np.int32), np.zeros(1, np.uint64), np.zeros(1, np.int64)))
    with pytest.raises(RuntimeError, match=r"missing shards \['b'\]"):
        bucket.pairs(["a", "b"])


LINES_ZH = ["床前明月光疑是地上霜", "举头望明月低头思故乡", "白日依山尽黄河入海流", "欲穷千里目更上一层楼",
            "春眠不觉晓处处闻啼鸟", "夜来风雨声花落知多少", "千山鸟飞绝万径人踪灭", "孤舟蓑笠翁独钓寒江雪",
            "红豆生南国春来发几枝", "愿君多采撷此物最相思", "空山不见人但闻人语响", "返景入深林复照青苔上"]


def test_curation_records_each_documents_language_drops_flagged_words_and_filters_languages(tmp_path):
    import json
    import random

    from deepkiln.testing import paragraph

    rng = random.Random(0)
    zh = ["，".join(rng.sample(LINES_ZH, 8)) + "。" for _ in range(20)]
    en = [paragraph(rng, 60) for _ in range(20)]
    rude_en = [paragraph(rng, 50) + " damn" * 5 for _ in range(4)]
    rude_zh = ["，".join(rng.sample(LINES_ZH, 8)) + "他妈的" * 3 + "。" for _ in range(3)]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                         for t in zh + en + rude_en + rude_zh))
    (tmp_path / "en.txt").write_text("damn\n")
    (tmp_path / "zh.txt").write_text("他妈的\n")
    files, _ = list_inputs(str(tmp_path / "raw"))
    splits = [s.to_dict() for s in plan_shards(files, 0, 1)[0]]

    def curate(name, **data):
        config = Config().to_dict()
        config["data"].update(flagged_words={"en": str(tmp_path / "en.txt"), "zh": str(tmp_path / "zh.txt")}, **data)
        owner = ShardOwner(name, splits, config, str(tmp_path / "prep"))
        return owner.curate(), owner.table

    stats, table = curate("all")
    assert stats["dropped"] == {"flagged_words": 7} and stats["docs_kept"] == 40, stats
    langs = table.column("lang").to_pylist()
    assert sorted(set(langs)) == ["en", "zh"] and langs.count("zh") == 20
    assert min(table.column("lang_share").to_pylist()) > 0.9
    stats, table = curate("zh-only", languages=["zh"])
    assert stats["dropped"] == {"flagged_words": 3, "language": 24} and set(table.column("lang").to_pylist()) == {"zh"}


def test_a_missing_flagged_words_file_is_refused_by_name(tmp_path):
    import pytest

    from actors.shard import flagged_words

    data = Config.from_dict({"data": {"flagged_words": {"zh": str(tmp_path / "none.txt")}}}).data
    with pytest.raises(ValueError, match=r"data.flagged_words\['zh'\]=.*none.txt' does not exist"):
        flagged_words(data)


def test_a_missing_or_empty_quality_reference_is_refused_naming_the_field(tmp_path):
    import pytest

    from actors.shard import reference_model
    from deepkiln.config import Config

    d = Config().data
    for ref, message in ((tmp_path / "nope", "no such file"), (tmp_path, "no .* files found")):
        with pytest.raises(ValueError, match=f"data.quality_reference='{ref}': {message}"):
            reference_model(d.model_copy(update={"quality_reference": [str(ref)]}))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        reference_model(d.model_copy(update={"quality_reference": [str(tmp_path / "blank.txt")]}))
    assert reference_model(d) is None



def test_source_strata_are_input_files_and_each_spreads_over_the_splits(tmp_path):
    """data.split_by=source: a stratum is the file a document came from, not the document itself
    (its source is "<file>:<record>"), so every file's documents spread over the splits."""
    import random

    from deepkiln.splits import assign_splits
    from tests.corpus_factory import paragraph, write_jsonl

    rng = random.Random(2)
    (tmp_path / "raw" / "web").mkdir(parents=True)
    write_jsonl(tmp_path / "raw" / "a.jsonl", [paragraph(rng) for _ in range(12)])
    write_jsonl(tmp_path / "raw" / "web" / "b.jsonl", [paragraph(rng) for _ in range(8)])
    owner = owner_for(tmp_path, tmp_path / "raw", num_shards=1)
    owner.curate()
    ids, strata = owner.kept(np.array([], dtype=np.int64), None, "source")
    assert sorted(set(strata)) == ["a.jsonl", "web/b.jsonl"] and len(ids) == 20
    targets = {"train": 0.5, "validation": 0.25, "test": 0.25}
    _, counts = assign_splits(ids.tolist(), strata, targets, {}, b"key")
    assert counts == {"a.jsonl": {"train": 6, "validation": 3, "test": 3},
                      "web/b.jsonl": {"train": 4, "validation": 2, "test": 2}}
    assert set(owner.kept(np.array([], dtype=np.int64), None, "lang")[1]) == {"en"}
    assert set(owner.kept(np.array([], dtype=np.int64), None, "none")[1]) == {"all"}
