import random

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


def edited_corpus(seed: int = 0):
    """Documents of 8 to 300 words, a third of them with a near copy (1 or 2 words replaced)."""
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(3000)]
    docs = [" ".join(rng.choices(vocab, k=rng.choice([8, 20, 40, 80, 150, 300]))) for _ in range(240)]
    for base in list(docs[:120]):
        words = base.split()
        for k in rng.sample(range(len(words)), rng.randint(1, 2)):
            words[k] = rng.choice(vocab)
        docs.append(" ".join(words))
    return docs


def test_simhash_blocked_search_returns_exactly_the_brute_force_pairs():
    docs = edited_corpus()
    fp, n = dedup.simhash(docs, shingle_size=3)
    assert (n > 0).all() and len(set(fp.tolist())) > 300
    for distance, max_distance in ((3, 6), (2, 2), (4, 9)):
        keys = dedup.simhash_keys(fp, max_distance)
        assert keys.shape == (len(docs), (max_distance + 2) * (max_distance + 1) // 2)
        band = np.broadcast_to(np.arange(keys.shape[1]), keys.shape).ravel()
        cand = dedup.bucket_pairs(band, keys.ravel(), np.repeat(np.arange(len(docs)), keys.shape[1]))
        found = cand[dedup.simhash_close(fp[cand[:, 0]], fp[cand[:, 1]], n[cand[:, 0]], n[cand[:, 1]],
                                         distance, max_distance)]
        i, j = np.triu_indices(len(docs), 1)
        close = dedup.simhash_close(fp[i], fp[j], n[i], n[j], distance, max_distance)
        brute = np.stack([i[close], j[close]], axis=1)
        assert len(brute) > 12 and sorted(map(tuple, found.tolist())) == sorted(map(tuple, brute.tolist()))


def test_simhash_threshold_grows_for_short_documents_and_near_copies_are_close():
    t = dedup.simhash_threshold(np.array([0, 10, 25, 50, 100, 400]), 3, 6)
    assert t.tolist() == [6, 6, 6, 4, 3, 3]
    a = "the quick brown fox jumps over the lazy dog " * 20
    fp, _ = dedup.simhash([a, a.replace("lazy", "sleepy", 1), "完全不同的一段中文文本，讲的是别的事情。" * 5])
    assert dedup.hamming(fp[0], fp[1]) <= 3 and dedup.hamming(fp[0], fp[2]) > 12
    assert dedup.simhash(["too short"])[1].tolist() == [0]
