"""ShardOwner: owns one data shard through every curation stage, and later its tokenization.

Stages, each persisted so that a restarted actor (whose `__init__` runs again with empty memory)
finds the finished ones on storage and does not redo them:
  curate   read -> strip markup -> normalise -> strip URLs -> language -> quality rules -> flagged
           words -> PII mask -> exact hash, MinHash signature, SimHash fingerprint
           => <prep>/work/<name>/curated.parquet + curated.json
  finalize drop the duplicates the driver resolved across all shards => <prep>/shards/<name>.parquet
  encode   tokenize the final shard => <tokens>/<name>.bin (packed ids) + <name>.idx.npy (doc offsets)
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from deepkiln import dedup, text
from deepkiln.config import Config
from deepkiln.corpus import Split, list_inputs, plan_shards, read_bytes, read_split, read_table, write_atomic
from deepkiln.faults import kill_once
from deepkiln.ngram import KneserNey
from deepkiln.splits import source_file

MINHASH_BATCH = 512  # documents per vectorised MinHash call


class ShardOwner:
    def __init__(self, name: str, splits: list[dict], config: dict, prep_dir: str):
        self.name = name
        self.splits = [Split(**s) for s in splits]
        self.cfg = Config.from_dict(config)
        self.curated_uri = f"{prep_dir}/work/{name}/curated.parquet"
        self.stats_uri = f"{prep_dir}/work/{name}/curated.json"
        self.final_uri = f"{prep_dir}/shards/{name}.parquet"
        self.docs_seen = 0
        self.flagged = flagged_words(self.cfg.data)
        # Resume: a finished curate stage on storage is loaded, not redone.
        stats = read_bytes(self.stats_uri)
        self.stats = json.loads(stats) if stats is not None else None
        self.table = read_table(self.curated_uri) if self.stats is not None else None
        if self.table is not None and self.stats.get("signature_version") != dedup.SIGNATURE_VERSION:
            self._refingerprint()  # curated by an earlier version: signatures comparable with new ones

    def progress(self) -> int:
        return self.docs_seen

    def curate(self, model: KneserNey | None = None) -> dict:
        """Run the curation stage (or return its saved stats) for this shard's splits; with a
        reference model, every kept document's perplexity under it is stored too."""
        if self.table is not None:
            return self.stats
        d = self.cfg.data
        quality = d.quality
        start = time.perf_counter()
        drops, pii, markup, problems = Counter(), Counter(), Counter(), []
        ids, sources, texts, langs, shares, ppl, docs_in, urls = [], [], [], [], [], [], 0, 0
        for split in self.splits:
            for rec in read_split(split, d.text_field):
                if "error" in rec:
                    problems.append(rec)
                    continue
                docs_in += 1
                self.docs_seen += 1
                if self.docs_seen == 100:
                    kill_once()  # no-op unless a kill test armed it
                clean, found, n = clean_text(rec["text"], d)
                markup.update(found)
                urls += n
                lang, share = text.language(clean)
                words = text.units(clean)  # once: the quality rules, flagged words and the model read them
                reason = ("language" if d.languages and lang not in d.languages else
                          text.quality_reason(clean, quality, words) or self._flagged(clean, lang, words))
                if reason:
                    drops[reason] += 1
                    continue
                ppl.append(model.perplexity(clean, words) if model is not None else None)
                clean, found = text.mask_pii(clean)
                pii.update(found)
                ids.append(rec["id"])
                sources.append(rec["source"])
                texts.append(clean)
                langs.append(lang)
                shares.append(share)
        sig, fingerprints, shingles = self._fingerprints(texts)
        table = pa.table({
            "id": pa.array(ids, pa.int64()),
            "source": pa.array(sources, pa.string()),
            "text": pa.array(texts, pa.string()),
            "lang": pa.array(langs, pa.string()),
            "lang_share": pa.array(shares, pa.float32()),
            "ppl": pa.array(ppl, pa.float32()),
            "exact": pa.array(np.array([dedup.exact_hash(t) for t in texts], dtype=np.uint64)),
            "sig": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), d.num_perm),
            "simhash": pa.array(fingerprints),
            "shingles": pa.array(shingles.astype(np.int32)),
        })
        stats = {"shard": self.name, "signature_version": dedup.SIGNATURE_VERSION,
                 "docs_in": docs_in, "docs_kept": len(ids), "urls_removed": urls,
                 "markup_removed": dict(sorted(markup.items())), "dropped": dict(sorted(drops.items())),
                 "pii_masked": dict(sorted(pii.items())),
                 "problems": problems, "seconds": round(time.perf_counter() - start, 3)}
        write_atomic(self.curated_uri, table)
        write_atomic(self.stats_uri, json.dumps(stats, indent=1).encode())  # written last: the stage is done
        self.table, self.stats = table, stats
        return stats

    def _refingerprint(self) -> None:
        sig, fingerprints, shingles = self._fingerprints(self.table.column("text").to_pylist())
        columns = {"sig": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), self.cfg.data.num_perm),
                   "simhash": pa.array(fingerprints), "shingles": pa.array(shingles.astype(np.int32))}
        for name, values in columns.items():
            if name in self.table.column_names:
                self.table = self.table.set_column(self.table.column_names.index(name), name, values)
            else:
                self.table = self.table.append_column(name, values)

    def _fingerprints(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MinHash signatures (N, P), SimHash fingerprints (N,) and shingle counts (N,), from one
        shingling of each batch."""
        d, parts = self.cfg.data, []
        for i in range(0, len(texts), MINHASH_BATCH):
            batch = texts[i:i + MINHASH_BATCH]
            shingles, doc = dedup.shingle_hashes(batch, d.shingle_size)
            parts.append((dedup.minhash_of(shingles, doc, len(batch), d.num_perm, self.cfg.run.seed),
                          *dedup.simhash_of(shingles, doc, len(batch))))
        if not parts:
            return np.zeros((0, d.num_perm), np.uint32), np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return tuple(np.concatenate(column) for column in zip(*parts))

    def _flagged(self, clean: str, lang: str, words: list[str]) -> str | None:
        """"flagged_words" when the lists for `lang` (and for every language) cover too much of it."""
        lists = self.flagged.get(lang) or self.flagged.get("*")
        if lists is None:
            return None
        too_much = text.flagged_ratio(clean, words, lists) > self.cfg.data.max_flagged_ratio
        return "flagged_words" if too_much else None

    def _signatures(self) -> np.ndarray:
        return self.table.column("sig").combine_chunks().flatten().to_numpy().reshape(len(self.table), -1)

    def band_keys(self, n_owners: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(band, key, id) triples split by owning LshBucketOwner (key mod n_owners). Bands below
        `bands` are MinHash's LSH bands, band `bands` carries the exact hash and the bands above it
        are SimHash's tables (each as data.near_dup_method asks); documents too short for a shingle
        only get the exact one."""
        d = self.cfg.data
        ids = self.table.column("id").to_numpy()
        has_shingles = self.table.column("shingles").to_numpy() > 0
        parts = [(np.full(len(ids), d.bands, dtype=np.int32), self.table.column("exact").to_numpy(), ids)]
        if d.near_dup_method in ("minhash", "both"):
            parts.append(_triples(dedup.band_keys(self._signatures(), d.bands, d.rows), ids, has_shingles, 0))
        if d.near_dup_method in ("simhash", "both"):
            keys = dedup.simhash_keys(self.table.column("simhash").to_numpy(), d.simhash_max_distance)
            parts.append(_triples(keys, ids, has_shingles, d.bands + 1))
        band, key, doc = (np.concatenate(column) for column in zip(*parts))
        owner = key % np.uint64(n_owners)
        return [(band[owner == j], key[owner == j], doc[owner == j]) for j in range(n_owners)]

    def signatures(self, ids: np.ndarray) -> tuple[np.ndarray, ...]:
        """(ids, MinHash signatures, SimHash fingerprints, shingle counts) of the requested documents
        that this shard owns."""
        mine = np.isin(self.table.column("id").to_numpy(), ids)
        return (self.table.column("id").to_numpy()[mine], self._signatures()[mine],
                self.table.column("simhash").to_numpy()[mine], self.table.column("shingles").to_numpy()[mine])

    def perplexities(self) -> tuple[list[str], np.ndarray]:
        """(language, perplexity) of every curated document (NaN where none was scored)."""
        return self.table.column("lang").to_pylist(), self._ppl()

    def _ppl(self) -> np.ndarray:
        if "ppl" not in self.table.column_names:  # curated before perplexities were stored
            return np.full(len(self.table), np.nan, dtype=np.float32)
        return self.table.column("ppl").to_numpy(zero_copy_only=False)

    def _verdicts(self, drop: np.ndarray, cutoffs: dict[str, dict[str, float]] | None):
        """(kept, duplicate, too perplexing, tercile bucket) of every curated document."""
        ids, langs, ppl = self.table.column("id").to_numpy(), self.table.column("lang").to_pylist(), self._ppl()
        duplicate = np.isin(ids, drop)
        cut = [(cutoffs or {}).get(lang) for lang in langs]
        bucket = [None if c is None or np.isnan(p) else "head" if p <= c["p33"] else "middle" if p <= c["p66"]
                  else "tail" for c, p in zip(cut, ppl)]
        too_perplexing = np.array([c is not None and c["max"] is not None and p > c["max"] for c, p in zip(cut, ppl)],
                                  dtype=bool)
        return ~duplicate & ~too_perplexing, duplicate, too_perplexing, bucket

    def kept(self, drop: np.ndarray, cutoffs: dict[str, dict[str, float]] | None, split_by: str) -> tuple:
        """(ids, strata) of the documents finalize will keep: what the driver assigns splits to."""
        keep = self._verdicts(drop, cutoffs)[0]
        if split_by == "none":
            strata = ["all"] * len(self.table)
        else:  # a language, or a source file (a document's source is "<file>:<record>")
            strata = self.table.column(split_by).to_pylist()
            strata = [source_file(s) for s in strata] if split_by == "source" else strata
        return self.table.column("id").to_numpy()[keep], [s for s, k in zip(strata, keep) if k]

    def finalize(self, drop: np.ndarray, cutoffs: dict[str, dict[str, float]] | None = None,
                 splits: tuple[np.ndarray, list[str]] | None = None) -> dict:
        """Write the shard without the dropped duplicates and, with `cutoffs` ({language: {p33, p66,
        max}}), without documents whose perplexity is above their language's max, each with its
        tercile bucket (head, middle, tail) and, with `splits` (ids, split names), its split (train
        otherwise); idempotent. Columns: id, source, text, lang, lang_share, ppl, ppl_bucket, split."""
        keep, duplicate, too_perplexing, bucket = self._verdicts(drop, cutoffs)
        split_of = dict(zip(splits[0].tolist(), splits[1])) if splits is not None else {}
        split = [split_of.get(i, "train") for i in self.table.column("id").to_pylist()]
        final = self.table.select(["id", "source", "text", "lang", "lang_share"])
        final = final.append_column("ppl", pa.array(self._ppl(), pa.float32(), from_pandas=True))  # NaN: null
        final = final.append_column("ppl_bucket", pa.array(bucket, pa.string()))
        final = final.append_column("split", pa.array(split, pa.string())).filter(pa.array(keep))
        write_atomic(self.final_uri, final)
        return {"shard": self.name, "docs_out": final.num_rows, "duplicates_removed": int(duplicate.sum()),
                "perplexity_removed": int((too_perplexing & ~duplicate).sum()),
                "languages": dict(Counter(final.column("lang").to_pylist()).most_common()),
                "splits": dict(Counter(final.column("split").to_pylist()).most_common())}

    def final_texts(self) -> dict[str, list[str]]:
        """The final shard's texts by split (a shard prepared before splits existed is all train)."""
        return {split: table.column("text").to_pylist() for split, table in self._final_by_split().items()}

    def _final_by_split(self) -> dict[str, pa.Table]:
        """The final shard's rows by split, in shard order."""
        table = read_table(self.final_uri)
        if table is None:
            raise ValueError(f"{self.final_uri} is missing: run pipelines.prepare first")
        splits = table.column("split").to_pylist() if "split" in table.column_names else ["train"] * table.num_rows
        rows: dict[str, list[int]] = {}
        for i, s in enumerate(splits):
            rows.setdefault(s, []).append(i)
        return {s: table.take(pa.array(r, pa.int64())) for s, r in rows.items()}

    def sample(self, n: int, seed: int) -> list[str]:
        """Up to n documents of the final shard, drawn without replacement, for tokenizer training."""
        texts = self.final_texts().get("train", [])
        pick = np.random.default_rng(seed).permutation(len(texts))[:n]
        return [texts[i] for i in sorted(pick)]

    def encode(self, tokenizer: dict[str, bytes], tokens_dir: str) -> list[dict]:
        """Tokenize the final shard with the tokenizer (its files(), as tokenizer_from_files reads
        them) into packed ids (each document followed by EOS) and the offsets where each document
        starts, one pair of files per split (<name>.bin for train, <name>.<split>.bin for the
        others); the dtype is uint16 when the vocabulary fits. Returns one index entry per file."""
        from deepkiln.tokenizer import tokenizer_from_files

        tok = tokenizer_from_files(tokenizer)
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        entries, by_split = [], self._final_by_split()
        for split in ("train", "validation", "test"):
            table = by_split.get(split)
            if table is None and split != "train":
                continue
            texts = table.column("text").to_pylist() if table is not None else []
            stem = self.name if split == "train" else f"{self.name}.{split}"
            docs = [ids + [tok.eos_id] for ids in tok.encode_batch(texts)]
            lengths = np.array([len(d) for d in docs], dtype=np.int64)
            packed = np.fromiter((t for d in docs for t in d), dtype=dtype, count=int(lengths.sum()))
            write_atomic(f"{tokens_dir}/{stem}.bin", packed.tobytes())
            write_atomic(f"{tokens_dir}/{stem}.idx.npy", _npy(np.concatenate([[0], np.cumsum(lengths)])))
            labels = {}
            for column in ("lang", "source"):  # what train.mixture strata are made of, a code per document
                values = table.column(column).to_pylist() if table is not None else []
                if column == "source":
                    values = [source_file(v) for v in values]
                legend = sorted(set(values))
                code = {x: k for k, x in enumerate(legend)}
                codes = np.array([code[v] for v in values], dtype=np.int32)
                write_atomic(f"{tokens_dir}/{stem}.{column}.npy", _npy(codes))
                tokens = np.bincount(codes, weights=lengths, minlength=len(legend))  # one pass, not one per label
                labels[column] = {"legend": legend, "codes": f"{stem}.{column}.npy",
                                  "tokens": {x: int(n) for x, n in zip(legend, tokens)}}
            entries.append({"shard": self.name, "split": split, "docs": len(docs), "tokens": int(lengths.sum()),
                            "dtype": np.dtype(dtype).name, "bin": f"{stem}.bin", "idx": f"{stem}.idx.npy",
                            "labels": labels})
        return entries


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def clean_text(raw: str, d) -> tuple[str, Counter, int]:
    """The text as curation sees it (markup stripped, normalised, URLs removed, as data asks), the
    markup removed by kind and the number of URLs removed."""
    found, urls = Counter(), 0
    if d.strip_markup:
        raw, found = text.strip_markup(raw)
    clean = text.normalize(raw)
    if d.remove_urls:
        clean, urls = text.remove_urls(clean)
    return clean, found, urls


def reference_model(d) -> KneserNey | None:
    """The Kneser-Ney model of data.quality_reference's text, cleaned as documents are; None without one."""
    if not d.quality_reference:
        return None
    texts = []
    for uri in d.quality_reference:
        files, _ = list_inputs(uri, "data.quality_reference")
        for split in plan_shards(files, 0, 1)[0]:
            cleaned = (clean_text(rec["text"], d)[0] for rec in read_split(split, d.text_field) if "error" not in rec)
            texts += [t for t in cleaned if t]
    if not texts:
        raise ValueError(f"data.quality_reference={d.quality_reference} holds no text")
    return KneserNey.fit(texts, d.quality_order)


def _triples(keys: np.ndarray, ids: np.ndarray, keep: np.ndarray, first_band: int):
    """(band, key, id) triples of a (N, T) key table, bands numbered from first_band, rows in keep."""
    band = np.broadcast_to(np.arange(first_band, first_band + keys.shape[1], dtype=np.int32), keys.shape)
    return band[keep].ravel(), keys[keep].ravel(), np.repeat(ids[keep], keys.shape[1])


def flagged_words(d) -> dict[str, tuple]:
    """data.flagged_words read and split for matching: {language: (words, CJK entries)}; a language's
    own list joins the `*` list."""
    lists = {}
    for lang, uri in d.flagged_words.items():
        raw = read_bytes(uri)
        if raw is None:
            raise ValueError(f"data.flagged_words[{lang!r}]={uri!r} does not exist")
        lists[lang] = raw.decode("utf-8", errors="replace").splitlines()
    shared = lists.get("*", [])
    return {lang: text.flagged_lists(words + (shared if lang != "*" else [])) for lang, words in lists.items()}


ShardOwnerActor = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=2)(ShardOwner)
