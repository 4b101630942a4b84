"""Test corpora with planted problems: near and exact duplicates, PII, junk and bad files."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq

from deepkiln.testing import paragraph  # noqa: F401  (re-exported for the tests)


def near_copy(text: str, rng: random.Random, changes: int = 1) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), changes):
        words[i] = "zebra" if not words[i].endswith(".") else "zebra."
    return " ".join(words)


def write_jsonl(path, docs, extra_lines=()):
    lines = [json.dumps({"text": d}) for d in docs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_corpus(root, seed: int = 0, n: int = 150) -> dict:
    """Two big jsonl files (different shards), a txt, a Parquet file and bad files. Returns the
    planted facts the tests check."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    a = [paragraph(rng) for _ in range(n)]
    b = [paragraph(rng) for _ in range(n)]
    a[7] = a[7] + " Write to jane.doe@example.com or call 555-123-4567; card 4111 1111 1111 1111."
    a[8] = "#### $$$ {{{ }}} ### ### ... ... " * 20           # junk
    b[3] = near_copy(a[3], rng)                              # near duplicate across shards
    b[5] = "  " + a[5].upper().replace(" ", "   ") + "  "     # exact duplicate up to case/space
    write_jsonl(root / "a.jsonl", a)
    write_jsonl(root / "b.jsonl", b, extra_lines=['{"text": "unterminated', '{"body": "no text field"}'])
    (root / "c.txt").write_text(paragraph(rng, 60), encoding="utf-8")
    pq.write_table(pa.table({"text": [paragraph(rng) for _ in range(5)] + [near_copy(b[10], rng)]}),
                   root / "d.parquet")
    (root / "blob.txt").write_bytes(b"\x89PNG\x00\x00binary" * 50)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    (root / "notes.csv").write_text("a,b\n1,2\n")
    return {"a": a, "b": b, "malformed_line": n + 1, "missing_field_line": n + 2}
