"""Tokenizer: train a SentencePiece BPE model on a sample of the prepared shards (or take the tokenizer
of the model that model.init imports), then have every ShardOwner encode its shard into packed token
ids for the trainer.

    python -m pipelines.tokenizer --config configs/tiny.yaml
    ray job submit --working-dir . -- python -m pipelines.tokenizer --config configs/small.yaml

Reads <run_dir>/<run.name>/prepare/ (run pipelines.prepare first) and writes
<run_dir>/<run.name>/tokenizer/: tokenizer.model, tokens/<shard>.bin (uint16 ids when the vocabulary
fits, else uint32; each document followed by EOS), tokens/<shard>.idx.npy (int64 document start
offsets, plus the end) and tokens/index.json (written last: the stage is complete when it exists).
A re-run writes a new folder beside the old one and swaps it in whole (on s3:// or gs://, where
folders do not rename, the old index is deleted first). Served artifacts carry their own copy of
tokenizer.model: a re-run never changes what a running server's ids decode to.

With model.init the imported folder's tokenizer is used as it is: its tokenizer.model (SentencePiece),
else its tokenizer.json and tokenizer_config.json (a `tokenizers` tokenizer, as DeepSeek publishes),
copied into tokenizer/; nothing is trained.
"""

from __future__ import annotations

import json
import os
import sys
import time
from itertools import chain
from pathlib import Path

import pyarrow.fs as pafs
import ray

from actors.shard import ShardOwnerActor
from deepkiln.config import load_config
from deepkiln.corpus import load_registry, replace_folder, resolve, write_atomic
from deepkiln.paths import RunPaths, is_uri
from deepkiln.ray_utils import cpus_per_actor, init_ray
from deepkiln.tokenizer import Tokenizer, character_fit, load_tokenizer, tokenizer_in, train_tokenizer


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    paths = RunPaths.of(cfg)
    prep, final = paths.stage("prepare"), paths.stage("tokenizer")
    if is_uri(final):  # no folder rename on object stores: the old index goes first, the new one comes last
        fs, where = resolve(f"{final}/tokens/index.json")
        if fs.get_file_info(where).type != pafs.FileType.NotFound:
            fs.delete_file(where)
        out = final
    else:  # written into a sibling and swapped in whole: a reader never sees old and new mixed
        out = f"{os.path.dirname(os.path.abspath(final))}/.tokenizer.tmp-{os.getpid()}"
        paths.remove(out)
    names = [n for g in load_registry(prep)["generations"] for n in g["shards"]]
    if not names:
        raise ValueError(f"no prepared shards under {prep}: run pipelines.prepare first")
    init_ray()
    start = time.perf_counter()
    cpus = cpus_per_actor(cfg.data.shard_cpus, len(names), "data.shard_cpus")
    owners = [ShardOwnerActor.options(num_cpus=cpus).remote(n, [], cfg.to_dict(), prep) for n in names]
    try:
        tok, fit = imported(cfg) or trained(cfg, owners)
        for name, data in tok.files().items():
            write_atomic(f"{out}/{name}", data)
        shards = [entry for part in ray.get([o.encode.remote(tok.files(), f"{out}/tokens") for o in owners])
                  for entry in part]
    finally:
        for actor in owners:
            ray.kill(actor)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens: more than "
                         f"model.vocab_size={cfg.model.vocab_size}")
    index = {
        "vocab_size": tok.vocab_size, "dtype": shards[0]["dtype"],
        "characters": fit,  # what training kept as pieces (None: an imported tokenizer)
        "special_ids": sorted(tok.special_ids), "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "total_docs": sum(s["docs"] for s in shards), "total_tokens": sum(s["tokens"] for s in shards),
        "shards": shards, "tokenizer": f"../{next(iter(tok.files()))}",
        "seconds": round(time.perf_counter() - start, 3),
        "config": cfg.to_dict(),
    }
    write_atomic(f"{out}/tokens/index.json", json.dumps(index, indent=1).encode())
    if out != final:
        replace_folder(Path(out), Path(final))
    out = final
    print(f"tokenizer: {index['total_docs']:,} documents -> {index['total_tokens']:,} tokens "
          f"({index['dtype']}) in {index['seconds']:.1f}s -> {out}", flush=True)
    return index


def imported(cfg):
    """(model.init's own tokenizer, None), or None without model.init."""
    if not cfg.model.init:
        return None
    found = tokenizer_in(cfg.model.init)
    if found is None:
        raise ValueError(f"model.init={cfg.model.init} holds no tokenizer.model or tokenizer.json: the imported "
                         "model's token ids need the tokenizer it was trained with")
    tok = load_tokenizer(found)
    print(f"tokenizer: using {found} ({tok.vocab_size} tokens) of the imported model", flush=True)
    return tok, None


def trained(cfg, owners) -> tuple[Tokenizer, dict]:
    """A SentencePiece tokenizer trained on a sample of every shard, and its character_fit."""
    per_shard = -(-cfg.tokenizer.sample_docs // len(owners))
    samples = ray.get([o.sample.remote(per_shard, cfg.run.seed + i) for i, o in enumerate(owners)])
    docs = list(chain.from_iterable(samples))
    _, fit = character_fit(docs, cfg.tokenizer.vocab_size)
    kept = ("every one" if fit["kept_chars"] == fit["distinct_chars"] else
            f"the {fit['kept_chars']:,} commonest as pieces, {fit['kept_share']:.1%} of the text; the rest as bytes")
    print(f"tokenizer: training BPE (vocab {cfg.tokenizer.vocab_size}) on {len(docs):,} sampled documents; "
          f"{fit['distinct_chars']:,} distinct characters: {kept}", flush=True)
    return Tokenizer(train_tokenizer(docs, cfg.tokenizer.vocab_size, cfg.tokenizer.character_coverage,
                                     cfg.run.seed)), fit


if __name__ == "__main__":
    main()
