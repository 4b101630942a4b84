"""ReplayBuffer: the online loop's training examples from user feedback; bounded, prioritised, durable.

The buffer ingests feedback records from the FeedbackCollectors' stores (`ingest(source, records)`:
the records and the source's new offset, the newest `seq` taken, commit in one SQLite transaction, so
a crash leaves both or neither and a re-ingest from `offset(source)` takes each record exactly once).
A record becomes an example when there is something to learn from it: a corrected answer (weight 1,
the user's own target) or a completion rated above the middle of the scale (weight rising with the
rating). Thumbs down without a correction is counted, not trained on.

Priority = weight x recency (halving every `online.half_life_s`). `draw(n)` returns up to n examples
not consumed yet, sampled by priority without replacement (seeded: the same draw after a restart),
with at most a share `max_share` of them from one client (the API key that posted the feedback);
`commit(keys, update)` deletes them (counted as consumed) once the update that used them is recorded,
so the file holds only what waits. The bound on
replay: an update that crashes before `commit` draws its examples again, once per crash. Beyond
`online.buffer_size` unconsumed examples, the lowest-priority ones are dropped (and counted).
A restarted actor runs `__init__` again and reopens the same file: it holds exactly the unconsumed
examples it held.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import numpy as np
import ray

from actors.feedback import head_node, transaction
from deepkiln.config import Config, FeedbackArgs, OnlineArgs
from deepkiln.paths import RunPaths

SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    source TEXT NOT NULL, seq INTEGER NOT NULL, completion_id TEXT NOT NULL, prompt TEXT NOT NULL,
    target TEXT NOT NULL, weight REAL NOT NULL, corrected INTEGER NOT NULL, model_version TEXT NOT NULL,
    created REAL NOT NULL, consumed_by INTEGER, client TEXT, PRIMARY KEY (source, seq));
CREATE TABLE IF NOT EXISTS offsets (source TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""
FIELDS = ["source", "seq", "completion_id", "prompt", "target", "weight", "corrected", "model_version", "created",
          "client"]


def example_of(record: dict, scale: FeedbackArgs) -> tuple[str, float, bool] | None:
    """(target text, weight, corrected) of a feedback record, or None when it teaches nothing."""
    if record.get("correction"):
        return record["correction"], 1.0, True
    middle = (scale.rating_min + scale.rating_max) / 2
    if record["rating"] > middle and record["completion"]:
        return record["completion"], (record["rating"] - middle) / (scale.rating_max - middle), False
    return None


class ReplayBuffer:
    def __init__(self, path: str, online: dict | None = None, feedback: dict | None = None):
        self.args, self.scale = OnlineArgs(**(online or {})), FeedbackArgs(**(feedback or {}))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        if "client" not in {row[1] for row in self.db.execute("PRAGMA table_info(examples)")}:
            self.db.execute("ALTER TABLE examples ADD COLUMN client TEXT")  # a store from before it:
            self.db.execute("UPDATE examples SET client = 'anonymous'")   # its examples had no client
        with transaction(self.db):  # a store from before consumed examples were deleted
            n = self.db.execute("DELETE FROM examples WHERE consumed_by IS NOT NULL").rowcount
            if n:
                self._count("consumed", n)

    def offset(self, source: str) -> int:
        """The newest feedback seq of `source` already ingested (0: none)."""
        row = self.db.execute("SELECT seq FROM offsets WHERE source = ?", (source,)).fetchone()
        return row[0] if row else 0

    def ingest(self, source: str, records: list[dict]) -> dict:
        """Take `source`'s records newer than its offset. Returns counts: added, not trainable,
        dropped for capacity."""
        after = self.offset(source)
        added = skipped = 0
        with transaction(self.db):
            for r in sorted(records, key=lambda r: r["seq"]):
                if r["seq"] <= after:
                    continue  # a retried call, or records the caller fetched twice
                example = example_of(r, self.scale)
                if example is None:
                    skipped += 1
                    continue
                target, weight, corrected = example
                self.db.execute(f"INSERT OR IGNORE INTO examples ({', '.join(FIELDS)}) VALUES "
                                f"({', '.join('?' * len(FIELDS))})",
                                (source, r["seq"], r["completion_id"], r["prompt"], target, weight, int(corrected),
                                 r["model_version"], r["created"], r.get("client") or "anonymous"))
                added += 1
            if records:
                newest = max(after, max(r["seq"] for r in records))
                self.db.execute("INSERT OR REPLACE INTO offsets VALUES (?, ?)", (source, newest))
            dropped = self._evict()
            for name, n in (("ingested", added), ("not_trainable", skipped), ("dropped", dropped)):
                self._count(name, n)
        return {"added": added, "not_trainable": skipped, "dropped": dropped}

    def _count(self, name: str, n: int) -> None:
        self.db.execute("INSERT INTO counts VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET n = n + ?", (name, n, n))

    def _evict(self) -> int:
        """Drop the lowest-priority unconsumed examples beyond the capacity."""
        rows = self._unconsumed()
        extra = len(rows) - self.args.buffer_size
        if extra <= 0:
            return 0
        order = np.argsort(self._priorities(rows), kind="stable")[:extra]
        self.db.executemany("DELETE FROM examples WHERE source = ? AND seq = ?",
                            [(rows[i]["source"], rows[i]["seq"]) for i in order])
        return extra

    def _unconsumed(self) -> list[dict]:
        cur = self.db.execute(f"SELECT {', '.join(FIELDS)} FROM examples WHERE consumed_by IS NULL "
                              "ORDER BY source, seq")
        return [dict(zip(FIELDS, r)) for r in cur]

    def _priorities(self, rows: list[dict], now: float | None = None) -> np.ndarray:
        now = time.time() if now is None else now
        age = np.array([max(0.0, now - r["created"]) for r in rows])
        return np.array([r["weight"] for r in rows]) * 0.5 ** (age / self.args.half_life_s)

    def size(self) -> int:
        return self.db.execute("SELECT count(*) FROM examples WHERE consumed_by IS NULL").fetchone()[0]

    def unconsumed(self) -> list[dict]:
        """Every example not consumed yet, by source and seq."""
        return self._unconsumed()

    def draw(self, n: int, seed: int = 0, now: float | None = None, max_share: float = 1.0) -> list[dict]:
        """Up to n unconsumed examples, sampled by priority without replacement (Efraimidis-Spirakis
        keys u^(1/p)), at most max(1, floor(max_share * n)) from one client (the rest of a client's
        wait for later draws); the same arguments over the same contents give the same draw."""
        rows = self._unconsumed()
        if not rows:
            return []
        p = np.maximum(self._priorities(rows, now), 1e-12)
        keys = np.log(np.random.default_rng(seed).random(len(rows))) / p
        cap, taken, out = max(1, int(max_share * min(n, len(rows)) + 1e-9)), {}, []
        for i in np.argsort(-keys, kind="stable"):
            client = rows[i]["client"]
            if taken.get(client, 0) < cap:
                taken[client] = taken.get(client, 0) + 1
                out.append(rows[i])
                if len(out) == n:
                    break
        return out

    def commit(self, keys: list[tuple[str, int]], update: int) -> int:
        """The examples (source, seq) were consumed by update number `update`: deleted (counted), so
        the buffer holds only what waits, however many updates ran; idempotent."""
        with transaction(self.db):
            before = self.db.total_changes
            self.db.executemany("DELETE FROM examples WHERE source = ? AND seq = ?", keys)
            self._count("consumed", self.db.total_changes - before)
        return self.size()

    def stats(self) -> dict:
        counts = dict(self.db.execute("SELECT name, n FROM counts").fetchall())
        corrected = self.db.execute("SELECT count(*) FROM examples WHERE consumed_by IS NULL AND corrected = 1"
                                    ).fetchone()[0]
        return {"unconsumed": self.size(), "unconsumed_corrected": corrected, "consumed": counts.get("consumed", 0),
                "capacity": self.args.buffer_size, **{k: counts.get(k, 0) for k in ("ingested", "not_trainable", "dropped")},
                "offsets": dict(self.db.execute("SELECT source, seq FROM offsets").fetchall())}


# Restarted after a crash with calls re-run: ingest and commit are idempotent, draw reads only.
ReplayBufferActor = ray.remote(max_restarts=-1, max_task_retries=-1)(ReplayBuffer)


def replay_buffer(cfg: Config):
    """The run's ReplayBuffer actor (named, detached; started on first use, on the head node)."""
    path = str(Path(RunPaths.of(cfg).replay_db).resolve())
    return ReplayBufferActor.options(
        name=f"deepkiln-replay-{hashlib.sha1(path.encode()).hexdigest()[:16]}", namespace="deepkiln",
        lifetime="detached", get_if_exists=True, num_cpus=0, scheduling_strategy=head_node(),
    ).remote(path, cfg.online.model_dump(), cfg.feedback.model_dump())
