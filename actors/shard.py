"""ShardOwner: owns one data shard through every curation stage, and later its tokenization.

Stages, each persisted so that a restarted actor (whose `__init__` runs again with empty memory)
finds the finished ones on storage and does not redo them:
  curate   read -> normalise -> strip URLs -> quality rules -> PII mask -> exact hash + MinHash
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
from deepkiln.corpus import Split, read_bytes, read_split, read_table, write_atomic
from deepkiln.faults import kill_once

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

    def progress(self) -> int:
        return self.docs_seen

    def curate(self) -> dict:
        """Run the curation stage (or return its saved stats) for this shard's splits."""
        if self.table is not None:
            return self.stats
        d = self.cfg.data
        quality = d.quality
        start = time.perf_counter()
        drops, pii, markup, problems = Counter(), Counter(), Counter(), []
        ids, sources, texts, langs, shares, docs_in, urls = [], [], [], [], [], 0, 0
        for split in self.splits:
            for rec in read_split(split, d.text_field):
                if "error" in rec:
                    problems.append(rec)
                    continue
                docs_in += 1
                self.docs_seen += 1
                if self.docs_seen == 100:
                    kill_once()  # no-op unless a kill test armed it
                raw = rec["text"]
                if d.strip_markup:
                    raw, found = text.strip_markup(raw)
                    markup.update(found)
                clean = text.normalize(raw)
                if d.remove_urls:
                    clean, n = text.remove_urls(clean)
                    urls += n
                lang, share = text.language(clean)
                reason = ("language" if d.languages and lang not in d.languages else
                          text.quality_reason(clean, quality) or self._flagged(clean, lang))
                if reason:
                    drops[reason] += 1
                    continue
                clean, found = text.mask_pii(clean)
                pii.update(found)
                ids.append(rec["id"])
                sources.append(rec["source"])
                texts.append(clean)
                langs.append(lang)
                shares.append(share)
        sig = np.concatenate(
            [dedup.minhash(texts[i:i + MINHASH_BATCH], d.num_perm, d.shingle_size, self.cfg.run.seed)
             for i in range(0, len(texts), MINHASH_BATCH)] or [np.zeros((0, d.num_perm), np.uint32)])
        table = pa.table({
            "id": pa.array(ids, pa.int64()),
            "source": pa.array(sources, pa.string()),
            "text": pa.array(texts, pa.string()),
            "lang": pa.array(langs, pa.string()),
            "lang_share": pa.array(shares, pa.float32()),
            "exact": pa.array(np.array([dedup.exact_hash(t) for t in texts], dtype=np.uint64)),
            "sig": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), d.num_perm),
        })
        stats = {"shard": self.name, "docs_in": docs_in, "docs_kept": len(ids), "urls_removed": urls,
                 "markup_removed": dict(sorted(markup.items())), "dropped": dict(sorted(drops.items())),
                 "pii_masked": dict(sorted(pii.items())),
                 "problems": problems, "seconds": round(time.perf_counter() - start, 3)}
        write_atomic(self.curated_uri, table)
        write_atomic(self.stats_uri, json.dumps(stats, indent=1).encode())  # written last: the stage is done
        self.table, self.stats = table, stats
        return stats

    def _flagged(self, clean: str, lang: str) -> str | None:
        """"flagged_words" when the lists for `lang` (and for every language) cover too much of it."""
        lists = self.flagged.get(lang) or self.flagged.get("*")
        if lists is None:
            return None
        too_much = text.flagged_ratio(clean, text.units(clean), lists) > self.cfg.data.max_flagged_ratio
        return "flagged_words" if too_much else None

    def _signatures(self) -> np.ndarray:
        return self.table.column("sig").combine_chunks().flatten().to_numpy().reshape(len(self.table), -1)

    def band_keys(self, n_owners: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(band, key, id) triples split by owning LshBucketOwner (key mod n_owners). Band index
        `bands` carries the exact hash; documents too short for a shingle only get that one."""
        d = self.cfg.data
        ids = self.table.column("id").to_numpy()
        sig = self._signatures()
        keys = dedup.band_keys(sig, d.bands, d.rows)                    # (N, Bd)
        has_shingles = ~(sig == dedup.EMPTY).all(axis=1)
        band = np.broadcast_to(np.arange(d.bands, dtype=np.int32), keys.shape)[has_shingles].ravel()
        key = keys[has_shingles].ravel()
        doc = np.repeat(ids[has_shingles], d.bands)
        band = np.concatenate([band, np.full(len(ids), d.bands, dtype=np.int32)])
        key = np.concatenate([key, self.table.column("exact").to_numpy()])
        doc = np.concatenate([doc, ids])
        owner = key % np.uint64(n_owners)
        return [(band[owner == j], key[owner == j], doc[owner == j]) for j in range(n_owners)]

    def signatures(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, signatures) of the requested documents that this shard owns."""
        mine = np.isin(self.table.column("id").to_numpy(), ids)
        return self.table.column("id").to_numpy()[mine], self._signatures()[mine]

    def finalize(self, drop: np.ndarray) -> dict:
        """Write the shard without the dropped duplicates (id, source, text, lang, lang_share); idempotent."""
        keep = ~np.isin(self.table.column("id").to_numpy(), drop)
        final = self.table.select(["id", "source", "text", "lang", "lang_share"]).filter(pa.array(keep))
        write_atomic(self.final_uri, final)
        return {"shard": self.name, "docs_out": final.num_rows, "duplicates_removed": int((~keep).sum()),
                "languages": dict(Counter(final.column("lang").to_pylist()).most_common())}

    def final_texts(self) -> list[str]:
        table = read_table(self.final_uri)
        if table is None:
            raise ValueError(f"{self.final_uri} is missing: run pipelines.prepare first")
        return table.column("text").to_pylist()

    def sample(self, n: int, seed: int) -> list[str]:
        """Up to n documents of the final shard, drawn without replacement, for tokenizer training."""
        texts = self.final_texts()
        pick = np.random.default_rng(seed).permutation(len(texts))[:n]
        return [texts[i] for i in sorted(pick)]

    def encode(self, tokenizer: dict[str, bytes], tokens_dir: str) -> dict:
        """Tokenize the final shard with the tokenizer (its files(), as tokenizer_from_files reads
        them) into packed ids (each document followed by EOS) and the offsets where each document
        starts; the dtype is uint16 when the vocabulary fits."""
        from deepkiln.tokenizer import tokenizer_from_files

        tok = tokenizer_from_files(tokenizer)
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        docs = [ids + [tok.eos_id] for ids in tok.encode_batch(self.final_texts())]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        packed = np.fromiter((t for d in docs for t in d), dtype=dtype, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        write_atomic(f"{tokens_dir}/{self.name}.bin", packed.tobytes())
        buf = io.BytesIO()
        np.save(buf, offsets)
        write_atomic(f"{tokens_dir}/{self.name}.idx.npy", buf.getvalue())
        return {"shard": self.name, "docs": len(docs), "tokens": int(lengths.sum()),
                "dtype": np.dtype(dtype).name, "bin": f"{self.name}.bin", "idx": f"{self.name}.idx.npy"}


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
