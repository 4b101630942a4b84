import numpy as np
import pytest

from bench.prepare import jaccard, make_docs, ours, shingles
from deepkiln import dedup
from deepkiln.config import DataArgs


def test_minhash_estimates_jaccard():
    docs, planted = make_docs(200, 40, size=5, seed=3)
    sig = dedup.minhash(docs, num_perm=256)
    for i, j, true in planted["pos"] + planted["neg"]:
        assert abs(dedup.estimated_jaccard(sig[i], sig[j]) - true) < 0.15, (true,)
    assert dedup.estimated_jaccard(sig[0], sig[1]) < 0.05        # unrelated documents


def test_shingles_ignore_case_and_punctuation_and_split_cjk_by_character():
    a, _ = dedup.shingle_hashes(["The cat sat on the mat."], 2)
    b, _ = dedup.shingle_hashes(["the CAT, sat on   the mat"], 2)
    assert np.array_equal(a, b) and len(a) == 5
    zh, doc = dedup.shingle_hashes(["我爱北京天安门", "短"], 3)
    assert len(zh) == 5 and set(doc.tolist()) == {0}              # 7 characters -> 5 shingles


def test_document_without_shingles_gets_empty_signature():
    sig = dedup.minhash(["too short", "one two three four five six"], shingle_size=5)
    assert (sig[0] == dedup.EMPTY).all() and not (sig[1] == dedup.EMPTY).all()


def test_signatures_do_not_depend_on_batching():
    docs, _ = make_docs(50, 5, size=5)
    whole = dedup.minhash(docs)
    parts = np.concatenate([dedup.minhash(docs[:17]), dedup.minhash(docs[17:])])
    assert np.array_equal(whole, parts)
    assert np.array_equal(dedup.minhash(docs, chunk=64), whole)


def test_bucket_pairs_link_every_member_to_the_lowest_id():
    band = np.array([0, 0, 0, 1, 1, 0])
    key = np.array([7, 7, 7, 7, 9, 8], dtype=np.uint64)
    ids = np.array([30, 10, 20, 40, 10, 50])
    assert dedup.bucket_pairs(band, key, ids).tolist() == [[10, 20], [10, 30]]


def test_clusters_keep_their_lowest_id_and_published_ids():
    pairs = np.array([[5, 9], [9, 12], [20, 21]])
    drop, clusters = dedup.duplicates_to_drop(pairs)
    assert drop.tolist() == [9, 12, 21] and clusters == 2
    drop, _ = dedup.duplicates_to_drop(pairs, keep_below=10)   # 9 was published before
    assert drop.tolist() == [12, 21]


def test_threshold_estimate_and_band_validation():
    assert dedup.jaccard_threshold(20, 6) == pytest.approx(0.607, abs=1e-3)
    assert dedup.candidate_probability(0.8, 20, 6) > 0.99
    with pytest.raises(ValueError, match="exceeds data.num_perm"):
        dedup.band_keys(np.zeros((2, 16), np.uint32), 5, 4)


def test_near_dedup_recall_and_precision_on_planted_pairs():
    docs, planted = make_docs(1500, 60, size=5, seed=1)
    assert all(jaccard(shingles(docs[i], 5), shingles(docs[j], 5)) == pytest.approx(t)
               for i, j, t in planted["pos"][:5])
    found = ours(docs, DataArgs())
    pos = {(i, j) for i, j, _ in planted["pos"]}
    neg = {(i, j) for i, j, _ in planted["neg"]}
    assert len(found & pos) / len(pos) >= 0.95
    assert not found & neg
