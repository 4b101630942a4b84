"""Prepare throughput with 1 and 2 ShardOwners, and near-dedup against datasketch, in one JSON object.

    python -m bench.prepare                      # ~20k documents, about 2 minutes on 2 cores
    python -m bench.prepare --docs 4000 --pairs 100 --no-pipeline
    pip install '.[bench]'                       # adds datatrove's MinHash pipeline to the comparison

Corpus: random paragraphs plus planted pairs at known word-5-gram Jaccard similarity: positives
(J >= 0.8) and hard negatives (J <= 0.5); nothing in between, so precision and recall measure the
method, not the threshold. Near-dedup (ours: vectorised MinHash + LSH bands + signature check) and a
datasketch MinHash(update_batch) + MinHashLSH loop with the same check run on the same documents
with the same shingles, permutations and bands x rows, in this process, on one core each, and so does
datatrove's MinHash pipeline (stages 1-3, files on local disk) when it is installed. SimHash
(blocked search + length-scaled Hamming check) runs on the same documents too: it is built for
near-exact copies, so its recall on pairs at Jaccard 0.8 is expected to be low and its precision high.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from deepkiln import dedup
from deepkiln.config import DataArgs
from deepkiln.precision import cpu_capability


def shingles(text: str, size: int) -> set[str]:
    w = text.lower().replace(".", " ").split()
    return {" ".join(w[i:i + size]) for i in range(len(w) - size + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def make_docs(n_docs: int, n_pairs: int, size: int, seed: int = 0):
    """Documents and the planted (i, j, jaccard) pairs: n_pairs positives and n_pairs negatives."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvw" for v in "aeiou"]
    vocab = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(30000)})
    docs = [" ".join(rng.choices(vocab, k=rng.randint(80, 160))) for _ in range(n_docs)]
    planted = {"pos": [], "neg": []}
    while min(len(v) for v in planted.values()) < n_pairs:
        i = rng.randrange(n_docs)
        words = docs[i].split()
        for k in rng.sample(range(len(words)), rng.choice([1, 1, 2, 3, 4, 10, 14, 20])):
            words[k] = rng.choice(vocab)
        variant = " ".join(words)
        j = jaccard(shingles(docs[i], size), shingles(variant, size))
        kind = "pos" if j >= 0.8 else "neg" if j <= 0.5 else None
        if kind and len(planted[kind]) < n_pairs:
            docs.append(variant)
            planted[kind].append((i, len(docs) - 1, j))
    return docs, planted


def _pairs(keys: np.ndarray) -> np.ndarray:
    """Candidate pairs from a (N, T) table of band keys."""
    band = np.broadcast_to(np.arange(keys.shape[1]), keys.shape).ravel()
    return dedup.bucket_pairs(band, keys.ravel(), np.repeat(np.arange(len(keys)), keys.shape[1]))


def ours(docs: list[str], d: DataArgs) -> set[tuple[int, int]]:
    """MinHash + LSH bands + signature check, as the pipeline runs it."""
    sig = np.concatenate([dedup.minhash(docs[i:i + 512], d.num_perm, d.shingle_size)
                          for i in range(0, len(docs), 512)])
    cand = _pairs(dedup.band_keys(sig, d.bands, d.rows))
    ok = dedup.estimated_jaccard(sig[cand[:, 0]], sig[cand[:, 1]]) >= d.near_dup_threshold
    return {tuple(p) for p in cand[ok].tolist()}


def ours_simhash(docs: list[str], d: DataArgs) -> set[tuple[int, int]]:
    """SimHash + blocked search + the length-scaled Hamming check, as the pipeline runs it."""
    fp, n = (np.concatenate(part) for part in zip(*(dedup.simhash(docs[i:i + 512], d.shingle_size)
                                                   for i in range(0, len(docs), 512))))
    cand = _pairs(dedup.simhash_keys(fp, d.simhash_max_distance))
    a, b = cand[:, 0], cand[:, 1]
    ok = dedup.simhash_close(fp[a], fp[b], n[a], n[b], d.simhash_distance, d.simhash_max_distance)
    return {tuple(p) for p in cand[ok].tolist()}


def datasketch_loop(docs: list[str], d: DataArgs) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    lsh, pairs = MinHashLSH(num_perm=d.num_perm, params=(d.bands, d.rows)), set()
    hashes = {}
    for i, text in enumerate(docs):
        m = MinHash(num_perm=d.num_perm)
        m.update_batch([s.encode() for s in shingles(text, d.shingle_size)])
        for j in lsh.query(m):
            if m.jaccard(hashes[j]) >= d.near_dup_threshold:
                pairs.add((j, i))
        lsh.insert(i, m)
        hashes[i] = m
    return pairs


def datatrove_pipeline(docs: list[str], d: DataArgs, work: Path) -> set[int] | None:
    """datatrove's MinHash deduplication (signatures, buckets, clusters: its stages 1-3, each
    stage's files on local disk as it runs them) with our shingles, bands and rows, one task per
    stage, on whitespace words. Returns the documents it would remove, or None without datatrove."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                      MinhashDedupSignature)
        from datatrove.utils.hashing import HashConfig
        from datatrove.utils.word_tokenizers import WordTokenizer
    except ImportError:
        return None
    import logging
    import os

    from loguru import logger

    os.environ.setdefault("TQDM_DISABLE", "1")  # its progress bars, read when a bar starts

    logger.remove()  # its progress lines: one per stage and bucket
    logging.getLogger("datatrove").setLevel(logging.WARNING)

    class Words(WordTokenizer):
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    config = MinhashConfig(n_grams=d.shingle_size, num_buckets=d.bands, hashes_per_bucket=d.rows,
                           hash_config=HashConfig(precision=32, hash_fc="sha1"))
    MinhashDedupSignature(str(work / "sigs"), config=config, language=Words()).run(
        (Document(text=t, id=str(i)) for i, t in enumerate(docs)), rank=0, world_size=1)
    for bucket in range(d.bands):
        MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config).run(rank=bucket,
                                                                                         world_size=d.bands)
    MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config).run()
    removed = (work / "remove" / "000000.remove").read_bytes()
    return set(np.frombuffer(removed, dtype="<u4").tolist())


def score(found: set, planted: dict) -> tuple[float, float]:
    pos = {(i, j) for i, j, _ in planted["pos"]}
    recall = len(found & pos) / len(pos)
    return recall, len(found & pos) / max(len(found), 1)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def pipeline_docs_per_s(docs: list[str], shards: int, work: Path) -> float:
    from pipelines import prepare

    raw = work / "raw"
    if not raw.exists():
        raw.mkdir(parents=True)
        for f in range(8):
            lines = (json.dumps({"text": t}) for t in docs[f::8])
            (raw / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    best = 0.0
    for attempt in range(2):  # the first run also pays for starting worker processes
        r = prepare.main(["--run.run_dir", str(work / "runs"), "--run.name", f"s{shards}-{attempt}",
                          "--data.input", str(raw), f"--data.num_shards={shards}", "--data.quality.min_units=16"])
        best = max(best, r["docs_per_s"])
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--no-pipeline", action="store_true",
                   help="near-dedup figures only (the prepare pipeline's docs_per_s_1/_2 are left out)")
    opts = p.parse_args(argv)
    d = DataArgs()
    docs, planted = make_docs(opts.docs, opts.pairs, d.shingle_size)
    found, t_ours = timed(ours, docs, d)
    found_sim, t_sim = timed(ours_simhash, docs, d)
    found_ds, t_ds = timed(datasketch_loop, docs, d)
    with tempfile.TemporaryDirectory() as tmp:
        removed_dt, t_dt = timed(datatrove_pipeline, docs, d, Path(tmp))
    recall, precision = score(found, planted)
    sim_recall, sim_precision = score(found_sim, planted)
    ds_recall, ds_precision = score(found_ds, planted)

    result = {
        "cpu_capability": cpu_capability(), "dtype": None,  # curation runs no model
        "docs": len(docs), "planted_positive_pairs": len(planted["pos"]),
        "planted_negative_pairs": len(planted["neg"]),
        "params": {"shingle_size": d.shingle_size, "num_perm": d.num_perm, "bands": d.bands, "rows": d.rows,
                   "verify_threshold": d.near_dup_threshold, "simhash_distance": d.simhash_distance,
                   "simhash_max_distance": d.simhash_max_distance},
        "dedup_docs_per_s": round(len(docs) / t_ours, 1), "datasketch_docs_per_s": round(len(docs) / t_ds, 1),
        "dedup_speedup_vs_datasketch": round(t_ds / t_ours, 2),
        "recall": round(recall, 4), "precision": round(precision, 4),
        "datasketch_recall": round(ds_recall, 4), "datasketch_precision": round(ds_precision, 4),
        "datatrove_docs_per_s": round(len(docs) / t_dt, 1) if removed_dt is not None else None,
        "dedup_speedup_vs_datatrove": round(t_dt / t_ours, 2) if removed_dt is not None else None,
        # the share of planted copies datatrove removes (it checks no signature: its recall)
        "datatrove_removed_planted": (round(len({j for _, j, _ in planted["pos"]} & removed_dt) / len(planted["pos"]),
                                            4) if removed_dt is not None else None),
        "simhash_docs_per_s": round(len(docs) / t_sim, 1),
        "simhash_recall": round(sim_recall, 4), "simhash_precision": round(sim_precision, 4),
    }
    if not opts.no_pipeline:
        result.update(pipeline_figures(docs))
    print(json.dumps(result))
    return result


def pipeline_figures(docs: list[str]) -> dict:
    """pipelines.prepare's throughput on the documents with 1 and 2 shards, on a local Ray."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            one = pipeline_docs_per_s(docs, 1, Path(tmp))
            two = pipeline_docs_per_s(docs, 2, Path(tmp))
    finally:
        ray.shutdown()
    return {"docs_per_s_1": round(one, 1), "docs_per_s_2": round(two, 1), "scaling_2_vs_1": round(two / one, 3)}


if __name__ == "__main__":
    main()
