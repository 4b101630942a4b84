import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from deepkiln.data import TokenWindows
from deepkiln.tokenizer import EOS_ID, Tokenizer
from pipelines import tokenizer

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def test_tokenizer_stage_trains_and_packs_every_shard(builtin_run):
    index = builtin_run["index"]  # the tokenizer stage on the prepared built-in corpus, this session
    out = builtin_run["root"] / "tokenizer"
    tok = Tokenizer.load(out / "tokenizer.model")
    assert index == json.loads((out / "tokens" / "index.json").read_text()) | {"config": index["config"]}
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size <= 2048
    rows = [r for s in sorted((builtin_run["root"] / "prepare" / "shards").glob("*.parquet"))
            for r in pq.read_table(s, columns=["text", "split"]).to_pylist()]
    texts = [r["text"] for r in rows]
    split_of = {r["text"]: r["split"] for r in rows}
    expected = sum(len(tok.encode(t)) + 1 for t in texts)   # + EOS per document
    assert index["total_tokens"] == expected and index["total_docs"] == len(texts)
    total = 0
    for shard in index["shards"]:
        ids = np.fromfile(out / "tokens" / shard["bin"], dtype=np.uint16)
        offsets = np.load(out / "tokens" / shard["idx"])
        assert len(ids) == shard["tokens"] == offsets[-1] and len(offsets) == shard["docs"] + 1
        assert (ids[offsets[1:] - 1] == EOS_ID).all()
        first = ids[offsets[0]:offsets[1] - 1].tolist()
        assert split_of[tok.decode(first)] == shard["split"]  # each split's documents in its own files
        total += len(ids)
    assert total == expected
    # Every split has documents (the tiny preset's 98/1/1 of the built-in corpus); training windows
    # come from the train files, held-out ones from the validation files, and test is left out.
    per_split = {p: sum(s["docs"] for s in index["shards"] if s["split"] == p) for p in ("train", "validation", "test")}
    assert per_split == {p: sum(r["split"] == p for r in rows) for p in per_split} and min(per_split.values()) > 10
    data = TokenWindows(out / "tokens", 128)
    train_tokens = sum(s["tokens"] for s in index["shards"] if s["split"] == "train")
    val_tokens = total - train_tokens - sum(s["tokens"] for s in index["shards"] if s["split"] == "test")
    stream, first = data.held[0]
    assert first == 0 and len(stream) == val_tokens and data.n_val == (val_tokens - 1) // 128
    first_val = data.window(data.n_train)[:-1].tolist()
    val_files = [s for s in index["shards"] if s["split"] == "validation"]
    assert first_val == np.fromfile(out / "tokens" / val_files[0]["bin"], dtype=np.uint16)[:128].tolist()
    # Each document's language and source file, for train.mixture: the built-in corpus's two languages,
    # and its Chinese files as sources of their own
    langs = {x for s in index["shards"] for x in s["labels"]["lang"]["legend"]}
    sources = {x for s in index["shards"] for x in s["labels"]["source"]["legend"]}
    assert {"en", "zh"} <= langs and {"zh/lunyu", "zh/shijing", "pydoc_data/topics"} <= sources
    mixed = TokenWindows(out / "tokens", 128, mixture={"zh/*": 1, "other": 1}, mixture_by="source")
    assert mixed.n_train + mixed.n_val <= data.n_train + data.n_val and mixed.describe()["left_out"]["docs"] == 0


def test_tokenizer_stage_needs_prepared_shards(tmp_path):
    with pytest.raises(ValueError, match="run pipelines.prepare first"):
        tokenizer.main(["--run.run_dir", str(tmp_path)])


def test_a_rerun_swaps_the_whole_stage_folder_in(builtin_run, tmp_path):
    """A re-run (another vocabulary) writes beside the old folder and swaps it in whole: the model,
    the shards and the index that come out all belong to the new tokenizer, and nothing is left over."""
    import shutil

    argv = list(builtin_run["argv"])
    argv[argv.index("--run.run_dir") + 1] = str(tmp_path)
    for stage in ("prepare", "tokenizer"):
        shutil.copytree(builtin_run["root"] / stage, tmp_path / "data" / stage)
    index = tokenizer.main([*argv, "--tokenizer.vocab_size=1024", "--tokenizer.sample_docs=500"])
    out = tmp_path / "data" / "tokenizer"
    tok = Tokenizer.load(out / "tokenizer.model")
    assert index["vocab_size"] == tok.vocab_size == 1024 != builtin_run["index"]["vocab_size"]
    assert json.loads((out / "tokens" / "index.json").read_text())["vocab_size"] == 1024
    shard = index["shards"][0]
    ids = np.fromfile(out / "tokens" / shard["bin"], dtype=np.uint16)
    assert ids.max() < 1024 and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepare", "tokenizer"]
