"""Prepare: raw text -> clean, PII-masked, deduplicated Parquet shards + prepare_report.json.

    python -m pipelines.prepare --config configs/tiny.yaml                     # built-in corpus
    python -m pipelines.prepare --config configs/small.yaml --data.input=s3://bucket/raw/
    ray job submit --working-dir . -- python -m pipelines.prepare --config configs/small.yaml --data.input=...

One ShardOwner actor per shard curates its files; LshBucketOwner actors pair up documents whose
exact hashes, MinHash LSH band keys or SimHash table keys collide across all shards; candidates are
verified on their MinHash signatures or SimHash fingerprints and every duplicate cluster keeps its
lowest id; each kept document's train/validation/test split is fixed (deepkiln.splits). Output, under
<run_dir>/<run.name>/prepare/: shards/<gen>-shard-<i>.parquet (id, source, text, lang, lang_share,
ppl, ppl_bucket, split), prepare_report.json, files.json (the file registry and the split counts).
Run again with new files in the input and only those are prepared, deduplicated against everything
prepared before (a new generation).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import numpy as np
import ray

from actors.dedup_index import LshBucketOwnerActor
from actors.shard import ShardOwnerActor, flagged_words, reference_model
from deepkiln import text
from deepkiln.config import load_config
from deepkiln.corpus import list_inputs, load_registry, plan_shards, read_bytes, write_atomic
from deepkiln.dedup import duplicates_to_drop, estimated_jaccard, jaccard_threshold, simhash_close
from deepkiln.paths import RunPaths
from deepkiln.ray_utils import cpus_per_actor, init_ray
from deepkiln.splits import assign_splits

HELPER_CPUS = 0  # bucket owners and owners of finished shards: light work, must never wait for a CPU


def _wait(refs: list, owners: list, what: str, every: float = 5.0) -> list:
    """ray.get with a progress line every few seconds (documents read so far, shards done)."""
    pending, start, last = list(refs), time.perf_counter(), 0.0
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        now = time.perf_counter() - start
        if now - last >= every or not pending:
            docs = sum(ray.get([o.progress.remote() for o in owners]))
            print(f"{what}: {len(refs) - len(pending)}/{len(refs)} shards done, {docs:,} documents read, "
                  f"{docs / max(now, 1e-9):,.0f} docs/s, {now:.0f}s", flush=True)
            last = now
    return ray.get(refs)


def _near_duplicates(minhash: np.ndarray, simhash: np.ndarray, owners: list, d) -> tuple[np.ndarray, np.ndarray]:
    """The MinHash candidates whose signatures agree on at least data.near_dup_threshold, and the
    SimHash candidates within the Hamming threshold of the shorter document."""
    wanted = np.unique(np.concatenate([minhash, simhash]))
    if len(wanted) == 0:
        return minhash, simhash
    found = ray.get([o.signatures.remote(wanted) for o in owners])
    ids, sig, fingerprints, shingles = (np.concatenate([f[i] for f in found]) for i in range(4))
    order = np.argsort(ids)
    ids, sig, fingerprints, shingles = ids[order], sig[order], fingerprints[order], shingles[order]

    def at(cand, column):
        return column[np.searchsorted(ids, cand[:, 0])], column[np.searchsorted(ids, cand[:, 1])]

    similar = estimated_jaccard(*at(minhash, sig)) >= d.near_dup_threshold
    close = simhash_close(*at(simhash, fingerprints), *at(simhash, shingles), d.simhash_distance,
                          d.simhash_max_distance)
    return minhash[similar], simhash[close]


def perplexity_cutoffs(langs: list[str], ppl: np.ndarray, max_percentile: float) -> dict[str, dict]:
    """Each language's perplexity terciles (p33, p66: CCNet's head/middle/tail) and the most it
    keeps (`max`, the max_percentile quantile; None at 1.0), over the documents scored."""
    by_lang = {}
    for lang, p in zip(langs, ppl):
        if not np.isnan(p):
            by_lang.setdefault(lang, []).append(p)
    cutoffs = {}
    for lang, values in sorted(by_lang.items()):
        p33, p66, top = np.quantile(values, [1 / 3, 2 / 3, max_percentile])
        cutoffs[lang] = {"docs": len(values), "p33": round(float(p33), 3), "p66": round(float(p66), 3),
                         "max": round(float(top), 3) if max_percentile < 1 else None}
    return cutoffs


def _summed(items: list[dict], key: str) -> Counter:
    """The counts under `key` of every shard's stats, added up (stats saved before the key existed: none)."""
    return sum((Counter(item.get(key, {})) for item in items), Counter())


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    d = cfg.data
    prep = RunPaths.of(cfg).stage("prepare")
    files, skipped = list_inputs(d.input)
    registry = load_registry(prep)
    new = [f for f in files if f[0] not in registry["files"]]
    if not new:
        print(f"prepare: nothing new in {d.input}; {prep} is up to date")
        return json.loads(read_bytes(f"{prep}/prepare_report.json"))
    flagged_words(d)  # a missing word list is refused before any actor starts
    model = reference_model(d)
    init_ray()
    start = time.perf_counter()
    gen, first_idx = len(registry["generations"]), len(registry["files"])
    methods = {"minhash": f"MinHash LSH {d.bands}x{d.rows} of {d.num_perm} permutations (candidates from Jaccard "
                          f"~{jaccard_threshold(d.bands, d.rows):.2f}, verified at {d.near_dup_threshold})",
               "simhash": f"SimHash within {d.simhash_distance}-{d.simhash_max_distance} bits (more for short "
                          f"documents)"}
    chosen = [m for k, m in methods.items() if d.near_dup_method in (k, "both")]
    print(f"prepare: {len(new)} new files -> {d.num_shards} shards (generation {gen}); near duplicates by "
          f"{' and '.join(chosen)}", flush=True)

    names = [f"gen-{gen:04d}-shard-{i:05d}" for i in range(d.num_shards)]
    cpus = cpus_per_actor(d.shard_cpus, d.num_shards, "data.shard_cpus")
    owners = [ShardOwnerActor.options(num_cpus=cpus).remote(n, [s.to_dict() for s in splits], cfg.to_dict(), prep)
              for n, splits in zip(names, plan_shards(new, first_idx, d.num_shards))]
    old_names = [n for g in registry["generations"] for n in g["shards"]]
    old = [ShardOwnerActor.options(num_cpus=HELPER_CPUS).remote(n, [], cfg.to_dict(), prep) for n in old_names]
    try:
        model_ref = ray.put(model) if model is not None else None
        curated = _wait([o.curate.remote(model_ref) for o in owners], owners, "curate")
        ray.get([o.curate.remote() for o in old])  # loads their saved stage
        scored = ray.get([o.perplexities.remote() for o in owners])
        cutoffs = perplexity_cutoffs([lang for s in scored for lang in s[0]],
                                     np.concatenate([s[1] for s in scored]), d.max_perplexity_percentile)

        # Cross-shard dedup: band keys go straight from shard owners to the bucket owners.
        buckets = [LshBucketOwnerActor.options(num_cpus=HELPER_CPUS).remote(d.bands) for _ in range(d.bucket_owners)]
        every, every_name = old + owners, old_names + names
        adds = []
        for name, owner in zip(every_name, every):
            parts = owner.band_keys.options(num_returns=d.bucket_owners).remote(d.bucket_owners)
            parts = parts if d.bucket_owners > 1 else [parts]
            adds += [b.add.remote(name, p) for b, p in zip(buckets, parts)]
        ray.get(adds)
        found = ray.get([b.pairs.remote(every_name) for b in buckets])
        exact, by_minhash, by_simhash = (np.unique(np.concatenate([f[k] for f in found]), axis=0).reshape(-1, 2)
                                         for k in range(3))
        near_minhash, near_simhash = _near_duplicates(by_minhash, by_simhash, every, d)
        keep_below = first_idx << 32  # documents published by earlier generations always stay
        drop, clusters = duplicates_to_drop(np.concatenate([exact, near_minhash, near_simhash]), keep_below)
        exact_drop, _ = duplicates_to_drop(exact, keep_below)
        kept = ray.get([o.kept.remote(drop, cutoffs, d.split_by) for o in owners])
        kept_ids = np.concatenate([k[0] for k in kept])
        split, split_counts = assign_splits(kept_ids.tolist(), [s for k in kept for s in k[1]], d.splits,
                                            registry.get("split_counts", {}), f"deepkiln-{cfg.run.seed}".encode())
        final = ray.get([o.finalize.remote(drop, cutoffs, (kept_ids, split)) for o in owners])
    finally:
        for actor in owners + old:
            ray.kill(actor)

    seconds = time.perf_counter() - start
    docs_in = sum(s["docs_in"] for s in curated)
    report = {
        "generation": gen, "input": d.input, "files": len(new), "skipped_files": skipped,
        "docs_in": docs_in, "docs_out": sum(f["docs_out"] for f in final),
        "languages": dict(_summed(final, "languages").most_common()),  # of the documents kept
        # by rule: quality, language, flagged_words, perplexity
        "dropped": dict(sorted((_summed(curated, "dropped") + Counter(
            perplexity=sum(f["perplexity_removed"] for f in final))).items())),
        "perplexity": {"reference": d.quality_reference, "order": d.quality_order,
                       "max_percentile": d.max_perplexity_percentile, "languages": cutoffs} if model else None,
        "splits": {"targets": d.splits, "by": d.split_by, "this_generation": dict(_summed(final, "splits")),
                   "every_generation": split_counts},
        "markup_removed": dict(sorted(_summed(curated, "markup_removed").items())),
        "exact_duplicates_removed": len(exact_drop), "near_duplicates_removed": len(drop) - len(exact_drop),
        "duplicate_clusters": clusters, "near_duplicate_candidates": len(by_minhash) + len(by_simhash),
        "near_duplicate_pairs": {"minhash": len(near_minhash), "simhash": len(near_simhash)},
        "dedup": {"method": d.near_dup_method, "shingle_size": d.shingle_size, "num_perm": d.num_perm,
                  "bands": d.bands, "rows": d.rows,
                  "jaccard_threshold_estimate": round(jaccard_threshold(d.bands, d.rows), 4),
                  "verify_threshold": d.near_dup_threshold, "simhash_distance": d.simhash_distance,
                  "simhash_max_distance": d.simhash_max_distance,
                  "simhash_candidates": len(by_simhash), "minhash_candidates": len(by_minhash)},
        "shards": [{**c, **f} for c, f in zip(curated, final)],
        "seconds": round(seconds, 3), "docs_per_s": round(docs_in / seconds, 1),
        "config": cfg.to_dict(),
    }
    body = json.dumps(report, indent=1).encode()
    write_atomic(f"{prep}/reports/gen-{gen:04d}.json", body)
    write_atomic(f"{prep}/prepare_report.json", body)
    registry["files"].update({uri: first_idx + i for i, (uri, _, _) in enumerate(new)})
    registry["generations"].append({"generation": gen, "first_file": first_idx, "shards": names})
    registry["split_counts"] = split_counts  # where the next generation's documents continue
    write_atomic(f"{prep}/files.json", json.dumps(registry, indent=1).encode())  # last: generation done
    print(f"prepare: {docs_in:,} documents in, {report['docs_out']:,} out "
          f"({report['exact_duplicates_removed']} exact and {report['near_duplicates_removed']} near "
          f"duplicates removed, {sum(len(s['problems']) for s in curated)} problems) in {seconds:.1f}s "
          f"-> {prep}/shards", flush=True)
    print(f"prepare: languages {text.language_mix(report['languages'], report['docs_out'])}", flush=True)
    return report


if __name__ == "__main__":
    main()
