"""Prepare throughput with 1 and 2 ShardOwners, and near-dedup against datasketch, in one JSON object.

    python -m bench.prepare                      # ~20k documents, about 2 minutes on 2 cores
    python -m bench.prepare --docs 4000 --pairs 100

Corpus: random paragraphs plus planted pairs at known word-5-gram Jaccard similarity: positives
(J >= 0.8) and hard negatives (J <= 0.5); nothing in between, so precision and recall measure the
method, not the threshold. Near-dedup (ours: vectorised MinHash + LSH bands + signature check) and a
datasketch MinHash(update_batch) + MinHashLSH loop with the same check run on the same documents
with the same shingles, permutations and bands x rows, in this process, on one core each.
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


def ours(docs: list[str], d: DataArgs) -> set[tuple[int, int]]:
    sig = np.concatenate([dedup.minhash(docs[i:i + 512], d.num_perm, d.shingle_size)
                          for i in range(0, len(docs), 512)])
    keys = dedup.band_keys(sig, d.bands, d.rows)
    band = np.broadcast_to(np.arange(d.bands), keys.shape).ravel()
    ids = np.repeat(np.arange(len(docs)), d.bands)
    cand = dedup.bucket_pairs(band, keys.ravel(), ids)
    ok = dedup.estimated_jaccard(sig[cand[:, 0]], sig[cand[:, 1]]) >= d.near_dup_threshold
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
    opts = p.parse_args(argv)
    d = DataArgs()
    docs, planted = make_docs(opts.docs, opts.pairs, d.shingle_size)
    found, t_ours = timed(ours, docs, d)
    found_ds, t_ds = timed(datasketch_loop, docs, d)
    recall, precision = score(found, planted)
    ds_recall, ds_precision = score(found_ds, planted)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            one = pipeline_docs_per_s(docs, 1, Path(tmp))
            two = pipeline_docs_per_s(docs, 2, Path(tmp))
    finally:
        ray.shutdown()
    result = {
        "cpu_capability": cpu_capability(), "dtype": None,  # curation runs no model
        "docs": len(docs), "planted_positive_pairs": len(planted["pos"]),
        "planted_negative_pairs": len(planted["neg"]),
        "params": {"shingle_size": d.shingle_size, "num_perm": d.num_perm, "bands": d.bands, "rows": d.rows,
                   "verify_threshold": d.near_dup_threshold},
        "docs_per_s_1": round(one, 1), "docs_per_s_2": round(two, 1), "scaling_2_vs_1": round(two / one, 3),
        "dedup_docs_per_s": round(len(docs) / t_ours, 1), "datasketch_docs_per_s": round(len(docs) / t_ds, 1),
        "dedup_speedup_vs_datasketch": round(t_ds / t_ours, 2),
        "recall": round(recall, 4), "precision": round(precision, 4),
        "datasketch_recall": round(ds_recall, 4), "datasketch_precision": round(ds_precision, 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
