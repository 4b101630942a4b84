import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepkiln.corpus import BUILTIN, doc_id, list_inputs, plan_shards, read_split, write_atomic, read_bytes


def docs_and_problems(split, field="text"):
    out = list(read_split(split, field))
    return [r for r in out if "error" not in r], [r for r in out if "error" in r]


def only_split(path, num_shards=1):
    files, _ = list_inputs(str(path))
    return plan_shards(files, 0, num_shards)


def test_jsonl_reader_reports_bad_lines_with_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "one"}\n\n{"text": \n{"body": "b"}\n["list"]\n{"text": "five"}\n')
    [[split]] = only_split(tmp_path)
    docs, problems = docs_and_problems(split)
    assert [(d["id"], d["source"], d["text"]) for d in docs] == [
        (doc_id(0, 1), "x.jsonl:1", "one"), (doc_id(0, 6), "x.jsonl:6", "five")]
    assert [(p["file"], p["line"]) for p in problems] == [("x.jsonl", 3), ("x.jsonl", 4), ("x.jsonl", 5)]
    assert "malformed JSON" in problems[0]["error"] and "'text'" in problems[1]["error"]


def test_custom_text_field_and_parquet(tmp_path):
    pq.write_table(pa.table({"body": ["a", None, "c"]}), tmp_path / "t.parquet")
    [[split]] = only_split(tmp_path)
    docs, problems = docs_and_problems(split, "body")
    assert [d["text"] for d in docs] == ["a", "c"] and problems[0]["line"] == 1
    _, problems = docs_and_problems(split, "text")
    assert "no column 'text'" in problems[0]["error"]


def test_binary_and_non_utf8_files_are_reported_and_skipped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "b.txt").write_bytes("na\xefve".encode("latin-1"))
    (tmp_path / "c.txt").write_text("fine text")
    results = [docs_and_problems(s) for s in only_split(tmp_path)[0]]
    assert [len(d) for d, _ in results] == [0, 0, 1]
    assert "binary" in results[0][1][0]["error"] and "not UTF-8" in results[1][1][0]["error"]


def test_missing_empty_and_unsupported_inputs(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        list_inputs(str(tmp_path / "missing"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="no .* files found"):
        list_inputs(str(tmp_path))
    (tmp_path / "y.txt").write_text("text")
    files, skipped = list_inputs(str(tmp_path))
    assert [f[1] for f in files] == ["y.txt"] and skipped[0]["file"] == "x.csv"


def test_a_big_file_is_split_by_record_across_shards(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(1, 101)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines))
    (tmp_path / "small.txt").write_text("tiny")
    files, _ = list_inputs(str(tmp_path))
    shards = plan_shards(files, 5, 2)
    ids = [sorted(d["id"] for s in shard for d in read_split(s)) for shard in shards]
    assert all(ids) and not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted([doc_id(5, i) for i in range(1, 101)] + [doc_id(6, 0)])
    assert plan_shards(files, 5, 2) == shards                        # deterministic


def test_builtin_corpus_has_real_text_ids_and_sources():
    files, skipped = list_inputs(BUILTIN)
    assert not skipped and files[0][1] == "pydoc_data/topics" and len(files) > 100
    [first, *_] = plan_shards(files[:3], 0, 1)
    docs = [d for s in first for d in read_split(s)]
    assert len(docs) > 50 and all(d["source"] and d["text"].strip() for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    # its Chinese: four classical texts shipped with deepkiln, about 300 KB, a file each
    zh = [f for f in files if f[1].startswith("zh/")]
    assert [f[1] for f in zh] == ["zh/chuci", "zh/lunyu", "zh/shijing", "zh/tang-poems"]
    assert 250_000 < sum(f[2] for f in zh) < 400_000
    docs = {f[1]: [d["text"] for s in plan_shards([f], 0, 1)[0] for d in read_split(s)] for f in zh}
    assert {k: len(v) for k, v in docs.items()} == {"zh/chuci": 65, "zh/lunyu": 20, "zh/shijing": 30,
                                                    "zh/tang-poems": 28}
    assert docs["zh/lunyu"][0].startswith("《论语·学而篇》\n子曰：“学而时习之，不亦说乎？")
    assert not any("#" in t or "\n\n" in t for texts in docs.values() for t in texts)  # comments and breaks gone


def test_write_atomic_replaces_whole_files(tmp_path):
    write_atomic(str(tmp_path / "a" / "f.bin"), b"one")
    write_atomic(str(tmp_path / "a" / "f.bin"), b"two")
    assert read_bytes(str(tmp_path / "a" / "f.bin")) == b"two"
    assert read_bytes(str(tmp_path / "a" / "none")) is None
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.bin"]
