"""The feedback store and the replay buffer over a long life: paging a large store, and the buffer
after many consumed updates. One JSON object.

    python -m bench.replay                          # 100,000 records, 200 updates: about a minute here
    python -m bench.replay --records 5000 --updates 20

`store`: a FeedbackCollector holding `--records` feedback records (written in bulk into its SQLite
file), read as the online loop reads it: `records(after)` page by page. The figures: pages, the
largest page (records and text bytes) against the page limits, seconds for the whole read and for
one page at the start and at the end of the store.

`replay`: with one update's worth of examples waiting, `--updates` rounds of what the online loop
does per update (ingest a page of new records, draw `--per-update` examples, commit them). The baseline is the first round, measured in the same
run: the buffer's rows, its file's bytes and the time of a draw after the first round and after the
last one. Consumed examples are deleted, so rows stay at what waits and the draw time stays flat.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def fill_store(collector, n: int) -> None:
    """`n` feedback records on one served completion, in one transaction (as if posted over months)."""
    from actors.feedback import transaction

    collector.remember("cmpl-0", "The river", "runs past the old mill.", "v0000")
    now = time.time()
    rows = [(f"fb-{i}", "cmpl-0", 1, f"correction number {i}: the river runs past the mill", "[]", "The river",
             "runs past the old mill.", "v0000", 0, now, None) for i in range(n)]
    with transaction(collector.db):
        collector.db.executemany(
            "INSERT INTO feedback (feedback_id, completion_id, rating, correction, tags, prompt, completion, "
            "model_version, pii_masked, created, user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def read_store(collector) -> dict:
    from actors.feedback import PAGE_BYTES, PAGE_RECORDS

    start = time.perf_counter()
    pages, after, largest, largest_bytes, page_s = 0, 0, 0, 0, []
    while True:
        t = time.perf_counter()
        page = collector.records(after)
        page_s.append(time.perf_counter() - t)
        if not page:
            break
        pages += 1
        largest = max(largest, len(page))
        largest_bytes = max(largest_bytes, sum(len(json.dumps(r)) for r in page))
        after = page[-1]["seq"]
    return {"pages": pages, "records_read": after, "largest_page_records": largest,
            "page_limit_records": PAGE_RECORDS, "largest_page_bytes": largest_bytes, "page_limit_bytes": PAGE_BYTES,
            "read_all_s": round(time.perf_counter() - start, 3), "first_page_ms": round(page_s[0] * 1e3, 2),
            "last_full_page_ms": round(page_s[-2] * 1e3, 2) if len(page_s) > 1 else None}


def replay_rounds(collector, buffer_path: Path, updates: int, per_update: int) -> dict:
    from actors.replay import ReplayBuffer

    buffer = ReplayBuffer(str(buffer_path), {"buffer_size": 10 * per_update})
    buffer.ingest("collector-0", collector.records(0, limit=per_update))  # a backlog of one update's worth waits
    rounds = []
    for u in range(1, updates + 1):
        buffer.ingest("collector-0", collector.records(buffer.offset("collector-0"), limit=per_update))
        t = time.perf_counter()
        drawn = buffer.draw(per_update, seed=u)
        draw_s = time.perf_counter() - t
        buffer.commit([(e["source"], e["seq"]) for e in drawn], u)
        rounds.append({"rows": buffer.db.execute("SELECT count(*) FROM examples").fetchone()[0],
                       "file_bytes": buffer_path.stat().st_size,  # its WAL is checkpointed and reused by SQLite
                       "draw_ms": round(draw_s * 1e3, 3)})
    first, last = rounds[0], rounds[-1]
    return {"updates": updates, "per_update": per_update, "consumed": buffer.stats()["consumed"],
            "rows_first": first["rows"], "rows_last": last["rows"], "file_bytes_first": first["file_bytes"],
            "file_bytes_last": last["file_bytes"], "draw_ms_first": first["draw_ms"], "draw_ms_last": last["draw_ms"],
            "draw_ms_ratio": round(last["draw_ms"] / max(first["draw_ms"], 1e-6), 3)}


def main(argv=None) -> dict:
    from actors.feedback import FeedbackCollector

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000, help="feedback records in the store")
    p.add_argument("--updates", type=int, default=200, help="online updates, each consuming --per-update examples")
    p.add_argument("--per-update", type=int, default=256, help="examples one update draws (online.max_feedback)")
    opts = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        collector = FeedbackCollector(str(Path(tmp) / "collector-0.sqlite"))
        t = time.perf_counter()
        fill_store(collector, opts.records)
        result = {"records": opts.records, "fill_s": round(time.perf_counter() - t, 2), "store": read_store(collector),
                  "replay": replay_rounds(collector, Path(tmp) / "replay.sqlite", opts.updates, opts.per_update)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
