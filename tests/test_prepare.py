import json
import random

import pyarrow.parquet as pq
import pytest

from deepkiln.corpus import doc_id, list_inputs, plan_shards
from pipelines import prepare
from tests.corpus_factory import en_doc, make_corpus, near_copy, paragraph, write_jsonl, zh_doc

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def run(tmp_path, data, name="t", *extra):
    return prepare.main(["--run.run_dir", str(tmp_path / "runs"), "--run.name", name,
                         "--data.input", str(data), "--data.num_shards=2", *extra])


def outputs(tmp_path, name="t"):
    shards = sorted((tmp_path / "runs" / name / "prepare" / "shards").glob("*.parquet"))
    rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
    return shards, {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    facts = make_corpus(root / "raw")
    return root / "raw", facts


@pytest.fixture(scope="module")
def calm(tmp_path_factory, corpus):
    """One uninterrupted prepare of the corpus: (folder holding runs/one, its report)."""
    root = tmp_path_factory.mktemp("calm")
    return root, run(root, corpus[0], "one")


def test_prepare_curates_dedups_across_shards_and_reports(corpus, calm):
    raw, facts = corpus
    files, _ = list_inputs(str(raw))
    rel = [f[1] for f in files]
    a, b = rel.index("a.jsonl"), rel.index("b.jsonl")
    shard_of = {s.file_idx: k for k, shard in enumerate(plan_shards(files, 0, 2)) for s in shard}
    assert shard_of[a] != shard_of[b]                      # the planted pairs straddle shards

    root, report = calm
    _, rows = outputs(root, "one")
    # near duplicate b[3] of a[3] and exact duplicate b[5] of a[5]: the lowest id (in a) stays
    assert doc_id(a, 4) in rows and doc_id(b, 4) not in rows
    assert doc_id(a, 6) in rows and doc_id(b, 6) not in rows
    assert report["exact_duplicates_removed"] >= 1 and report["near_duplicates_removed"] >= 2
    assert doc_id(a, 9) not in rows                        # junk dropped by a quality rule
    masked = rows[doc_id(a, 8)]["text"]
    assert "<EMAIL>" in masked and "<PHONE>" in masked and "<CARD>" in masked
    assert "jane.doe" not in masked and "4111" not in masked
    assert len(rows) == report["docs_out"] == len(set(r["text"] for r in rows.values()))
    # bad input is reported with file and line, not a crash
    problems = [p for s in report["shards"] for p in s["problems"]]
    assert {"file": "b.jsonl", "line": facts["malformed_line"]} in [
        {k: p.get(k) for k in ("file", "line")} for p in problems]
    assert any(p["file"] == "b.jsonl" and p.get("line") == facts["missing_field_line"] for p in problems)
    assert any(p["file"] == "blob.txt" and "binary" in p["error"] for p in problems)
    assert any(p["file"] == "latin1.txt" and "UTF-8" in p["error"] for p in problems)
    assert report["skipped_files"][0]["file"] == "notes.csv"
    dropped = {k: v for s in report["shards"] for k, v in s["dropped"].items()}
    assert sum(dropped.values()) >= 1
    pii = {}
    for s in report["shards"]:
        for k, v in s["pii_masked"].items():
            pii[k] = pii.get(k, 0) + v
    assert pii["EMAIL"] >= 1 and pii["CARD"] >= 1
    assert 0.5 < report["dedup"]["jaccard_threshold_estimate"] < 0.8
    saved = json.loads((root / "runs" / "one" / "prepare" / "prepare_report.json").read_text())
    assert saved["docs_out"] == report["docs_out"] and saved["config"]["data"]["input"] == str(raw)


def test_prepare_twice_gives_identical_files(tmp_path, corpus, calm):
    raw, _ = corpus
    run(tmp_path, raw, "two")
    one, _ = outputs(calm[0], "one")
    two, _ = outputs(tmp_path, "two")
    assert [p.name for p in one] == [p.name for p in two] and one
    for x, y in zip(one, two):
        assert x.read_bytes() == y.read_bytes()


@pytest.mark.slow
def test_killed_shard_owner_resumes_and_output_is_unchanged(tmp_path, corpus, calm, ray_local):
    raw, _ = corpus
    ray_local.unlink()                                     # arm: the next owner past 100 docs dies
    report = run(tmp_path, raw, "killed")
    assert ray_local.exists()                              # the SIGKILL happened
    calm, calm_rows = outputs(calm[0], "one")
    killed, killed_rows = outputs(tmp_path, "killed")
    assert sorted(killed_rows) == sorted(calm_rows)        # same ids: none missing, none extra
    for x, y in zip(calm, killed):
        assert x.read_bytes() == y.read_bytes()
    assert report["docs_out"] == len(killed_rows)


def test_incremental_run_dedups_new_files_against_prepared_ones(tmp_path):
    rng = random.Random(1)
    raw = tmp_path / "raw"
    raw.mkdir()
    old = [paragraph(rng) for _ in range(20)]
    write_jsonl(raw / "a.jsonl", old)
    halves = "--data.splits={train: 0.5, validation: 0.25, test: 0.25}"
    first = run(tmp_path, raw, "t", halves)
    before, rows_before = outputs(tmp_path)
    snapshot = {p.name: p.read_bytes() for p in before}

    fresh = paragraph(rng)
    write_jsonl(raw / "b.jsonl", [near_copy(old[2], rng), old[4], fresh])
    second = run(tmp_path, raw, "t", halves)
    assert second["generation"] == 1 and first["generation"] == 0
    # Splits: 20 kept, then one more; the old documents keep theirs (the files are unchanged, below)
    # and the counts continue within one document of 50/25/25.
    shares = {"train": 0.5, "validation": 0.25, "test": 0.25}
    for report, docs in ((first, 20), (second, 21)):
        counts = report["splits"]["every_generation"]
        assert sum(sum(c.values()) for c in counts.values()) == docs
        assert all(abs(c[p] - shares[p] * sum(c.values())) < 1 for c in counts.values() for p in shares)
    assert {r["split"] for r in rows_before.values()} == {"train", "validation", "test"}
    assert second["files"] == 1 and second["docs_in"] == 3 and second["docs_out"] == 1
    after, rows_after = outputs(tmp_path)
    assert {p.name: p.read_bytes() for p in after if p.name in snapshot} == snapshot
    new_texts = [r["text"] for i, r in rows_after.items() if i not in rows_before]
    assert new_texts == [fresh]
    third = run(tmp_path, raw)                              # nothing new: the report is returned as is
    assert third["generation"] == 1


def test_missing_or_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        run(tmp_path, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .* files found"):
        run(tmp_path, tmp_path / "empty")


@pytest.mark.slow
def test_builtin_corpus_needs_nothing_but_the_preset(builtin_run):
    report = builtin_run["prepare"]  # prepare.main with configs/tiny.yaml and no input, this session
    assert report["input"] == "builtin" and report["docs_out"] > 1000
    assert report["docs_out"] < report["docs_in"]
    # Every kept document's language is counted (Python's documentation: English, with code in it).
    assert sum(report["languages"].values()) == report["docs_out"] and next(iter(report["languages"])) == "en"
    assert report["dropped"] and sum(report["dropped"].values()) <= report["docs_in"] - report["docs_out"]


def test_perplexity_filter_drops_shuffled_text_per_language_and_simhash_finds_a_near_copy(tmp_path):
    """A trusted reference (Chinese and English sentences), an input of the same kind of text plus
    the same words shuffled: the shuffled ones are each language's worst and go first; every kept
    document carries its perplexity and tercile. A copy with one word appended is found by SimHash."""
    rng = random.Random(0)
    (tmp_path / "ref").mkdir()
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "ref" / "trusted.jsonl", [make(rng)[0] for make in (zh_doc, en_doc) for _ in range(300)])
    real, shuffled = [], []
    for make, joiner in ((zh_doc, ""), (en_doc, " ")):
        for _ in range(60):
            real.append(make(rng)[0])
        for _ in range(15):
            words = make(rng)[1]
            rng.shuffle(words)
            shuffled.append(joiner.join(words))
    long = " ".join(en_doc(rng)[0] for _ in range(4))
    write_jsonl(tmp_path / "raw" / "docs.jsonl", real + shuffled + [long, long + " Zebra."])
    report = run(tmp_path, tmp_path / "raw", "t", f"--data.quality_reference=[{tmp_path / 'ref'}]",
                 "--data.max_perplexity_percentile=0.85", "--data.quality.min_units=10",
                 # the grammar repeats its phrases: the repetition rules would drop most of it
                 "--data.quality.max_dup_ngram_char_ratio={}", "--data.quality.max_top_ngram_char_ratio={}")
    _, rows = outputs(tmp_path)
    kept = {r["text"] for r in rows.values()}
    assert set(real) <= kept and len(set(shuffled) & kept) <= 6
    assert report["dropped"]["perplexity"] == len(set(shuffled) - kept) >= 24
    languages = report["perplexity"]["languages"]
    assert set(languages) >= {"zh", "en"} and all(c["p33"] < c["p66"] < c["max"] for c in languages.values())
    assert {r["ppl_bucket"] for r in rows.values()} == {"head", "middle", "tail"}
    assert all(r["ppl"] > 1 for r in rows.values())
    assert report["near_duplicate_pairs"]["simhash"] >= 1 and long in kept and long + " Zebra." not in kept
