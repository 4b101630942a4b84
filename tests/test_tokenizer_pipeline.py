import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from deepkiln.tokenizer import EOS_ID, Tokenizer
from pipelines import tokenizer

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def test_tokenizer_stage_trains_and_packs_every_shard(builtin_run):
    index = builtin_run["index"]  # the tokenizer stage on the prepared built-in corpus, this session
    out = builtin_run["root"] / "tokenizer"
    tok = Tokenizer.load(out / "tokenizer.model")
    assert index == json.loads((out / "tokens" / "index.json").read_text()) | {"config": index["config"]}
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size <= 2048
    texts = [t for s in sorted((builtin_run["root"] / "prepare" / "shards").glob("*.parquet"))
             for t in pq.read_table(s).column("text").to_pylist()]
    expected = sum(len(tok.encode(t)) + 1 for t in texts)   # + EOS per document
    assert index["total_tokens"] == expected and index["total_docs"] == len(texts)
    total = 0
    for shard in index["shards"]:
        ids = np.fromfile(out / "tokens" / shard["bin"], dtype=np.uint16)
        offsets = np.load(out / "tokens" / shard["idx"])
        assert len(ids) == shard["tokens"] == offsets[-1] and len(offsets) == shard["docs"] + 1
        assert (ids[offsets[1:] - 1] == EOS_ID).all()
        first = ids[offsets[0]:offsets[1] - 1].tolist()
        assert tok.decode(first) in texts
        total += len(ids)
    assert total == expected


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
