"""ReplayBuffer: the online loop's training examples from user feedback; bounded, prioritised, durable.

The buffer ingests feedback records from the FeedbackCollectors' stores (`ingest(source, records)`:
the records and the source's new offset, the newest `seq` taken, commit in one SQLite transaction, so
a crash leaves both or neither and a re-ingest from `offset(source)` takes each record exactly once).
A record becomes a supervised (SFT) example when there is something to imitate: a corrected answer
(weight 1, the user's own target) or a completion rated above the middle of the scale (weight rising
with the rating). Beside them the buffer keeps what preference updates learn from
(deepkiln.preferences): pairs (a correction over the served answer; two rated answers of one prompt,
the better one chosen) for DPO, and labelled answers (desirable or not, by rating; a correction is
desirable) for KTO, so a thumbs down teaches a preference update. Each kind is drawn, consumed and
bounded on its own (`kind=`).

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
from deepkiln.preferences import Pair, preference_items, ranked_pair

SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    source TEXT NOT NULL, seq INTEGER NOT NULL, completion_id TEXT NOT NULL, prompt TEXT NOT NULL,
    target TEXT NOT NULL, weight REAL NOT NULL, corrected INTEGER NOT NULL, model_version TEXT NOT NULL,
    created REAL NOT NULL, consumed_by INTEGER, client TEXT, PRIMARY KEY (source, seq));
CREATE TABLE IF NOT EXISTS preferences (
    source TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, part TEXT NOT NULL, completion_id TEXT NOT NULL,
    prompt TEXT NOT NULL, chosen TEXT NOT NULL, rejected TEXT, desirable INTEGER, weight REAL NOT NULL,
    model_version TEXT NOT NULL, created REAL NOT NULL, client TEXT NOT NULL, PRIMARY KEY (source, seq, kind, part));
CREATE TABLE IF NOT EXISTS ratings (
    source TEXT NOT NULL, seq INTEGER NOT NULL, prompt TEXT NOT NULL, completion TEXT NOT NULL, rating INTEGER NOT NULL,
    completion_id TEXT NOT NULL, model_version TEXT NOT NULL, created REAL NOT NULL, client TEXT NOT NULL,
    PRIMARY KEY (source, seq));
CREATE INDEX IF NOT EXISTS ratings_by_prompt ON ratings (prompt);
CREATE TABLE IF NOT EXISTS offsets (source TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""
FIELDS = ["source", "seq", "completion_id", "prompt", "target", "weight", "corrected", "model_version", "created",
          "client"]
PREFERENCE_FIELDS = ["source", "seq", "kind", "part", "completion_id", "prompt", "chosen", "rejected", "desirable",
                     "weight", "model_version", "created", "client"]
RATING_FIELDS = ["source", "seq", "prompt", "completion", "rating", "completion_id", "model_version", "created",
                 "client"]
KINDS = ("sft", "pair", "label")
"""What the buffer holds: supervised examples (SFT: target texts with weights), preference pairs
(chosen over rejected, DPO), and labelled completions (desirable or not, KTO)."""


def example_of(record: dict, scale: FeedbackArgs) -> tuple[str, float, bool] | None:
    """(target text, weight, corrected) of a feedback record, or None when it teaches nothing."""
    if record.get("correction"):
        return record["correction"], 1.0, True
    middle = (scale.rating_min + scale.rating_max) / 2
    if record["rating"] > middle and record["completion"]:
        return record["completion"], (record["rating"] - middle) / (scale.rating_max - middle), False
    return None


def key_of(row: dict) -> tuple:
    """What `commit` takes for a drawn row: (source, seq), and a preference's kind and part."""
    return (row["source"], row["seq"]) if "target" in row else (row["source"], row["seq"], row["kind"], row["part"])


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
        """Take `source`'s records newer than its offset. Returns counts of supervised examples: added,
        not trainable (no supervised example: its pairs and labels, if any, are kept), dropped for
        capacity (pairs and labels dropped are counted in `stats`)."""
        after = self.offset(source)
        added = skipped = 0
        with transaction(self.db):
            for r in sorted(records, key=lambda r: r["seq"]):
                if r["seq"] <= after:
                    continue  # a retried call, or records the caller fetched twice
                self._prefer(source, r)
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
            dropped = self._evict("sft")
            for kind in ("pair", "label"):
                self._count(f"dropped_{kind}s", self._evict(kind))
            self.db.execute("DELETE FROM ratings WHERE rowid IN (SELECT rowid FROM ratings ORDER BY created DESC "
                            "LIMIT -1 OFFSET ?)", (self.args.buffer_size,))
            for name, n in (("ingested", added), ("not_trainable", skipped), ("dropped", dropped)):
                self._count(name, n)
        return {"added": added, "not_trainable": skipped, "dropped": dropped}

    def _prefer(self, source: str, r: dict) -> None:
        """The record's preference pairs and labels (deepkiln.preferences), and the ranked pairs its
        rating makes with earlier ratings of the same prompt (the newest online.buffer_size kept)."""
        client = r.get("client") or "anonymous"
        rows = []
        for item in preference_items(r, self.scale, self.args):
            if isinstance(item, Pair):
                rows.append(("pair", "correction", item.chosen, item.rejected, None, item.margin))
            else:
                rows.append(("label", "correction" if item.completion == r.get("correction") else "served",
                             item.completion, None, int(item.desirable), 1.0))
        if r["completion"]:
            cur = self.db.execute(f"SELECT {', '.join(RATING_FIELDS)} FROM ratings WHERE prompt = ?", (r["prompt"],))
            for other in (dict(zip(RATING_FIELDS, row)) for row in cur.fetchall()):
                pair = ranked_pair(r, other, self.scale)
                if pair is not None:
                    rows.append(("pair", f"{other['source']}:{other['seq']}", pair.chosen, pair.rejected, None,
                                 pair.margin))
            self.db.execute(f"INSERT OR IGNORE INTO ratings ({', '.join(RATING_FIELDS)}) VALUES "
                            f"({', '.join('?' * len(RATING_FIELDS))})",
                            (source, r["seq"], r["prompt"], r["completion"], r["rating"], r["completion_id"],
                             r["model_version"], r["created"], client))
        self.db.executemany(f"INSERT OR IGNORE INTO preferences ({', '.join(PREFERENCE_FIELDS)}) VALUES "
                            f"({', '.join('?' * len(PREFERENCE_FIELDS))})",
                            [(source, r["seq"], kind, part, r["completion_id"], r["prompt"], chosen, rejected,
                              desirable, weight, r["model_version"], r["created"], client)
                             for kind, part, chosen, rejected, desirable, weight in rows])

    def _count(self, name: str, n: int) -> None:
        self.db.execute("INSERT INTO counts VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET n = n + ?", (name, n, n))

    def _evict(self, kind: str) -> int:
        """Drop the lowest-priority unconsumed rows of `kind` beyond the capacity."""
        rows = self._unconsumed(kind)
        extra = len(rows) - self.args.buffer_size
        if extra <= 0:
            return 0
        order = np.argsort(self._priorities(rows), kind="stable")[:extra]
        self._delete(kind, [key_of(rows[i]) for i in order])
        return extra

    def _delete(self, kind: str, keys: list[tuple]) -> None:
        if kind == "sft":
            self.db.executemany("DELETE FROM examples WHERE source = ? AND seq = ?", keys)
        else:
            self.db.executemany("DELETE FROM preferences WHERE source = ? AND seq = ? AND kind = ? AND part = ?", keys)

    def _unconsumed(self, kind: str = "sft") -> list[dict]:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        if kind == "sft":
            cur = self.db.execute(f"SELECT {', '.join(FIELDS)} FROM examples WHERE consumed_by IS NULL "
                                  "ORDER BY source, seq")
            return [dict(zip(FIELDS, r)) for r in cur]
        cur = self.db.execute(f"SELECT {', '.join(PREFERENCE_FIELDS)} FROM preferences WHERE kind = ? "
                              "ORDER BY source, seq, part", (kind,))
        return [dict(zip(PREFERENCE_FIELDS, r)) for r in cur]

    def _priorities(self, rows: list[dict], now: float | None = None) -> np.ndarray:
        now = time.time() if now is None else now
        age = np.array([max(0.0, now - r["created"]) for r in rows])
        return np.array([r["weight"] for r in rows]) * 0.5 ** (age / self.args.half_life_s)

    def size(self, kind: str = "sft") -> int:
        """Unconsumed rows of `kind` (one of KINDS)."""
        return len(self._unconsumed(kind))

    def unconsumed(self, kind: str = "sft") -> list[dict]:
        """Every row of `kind` not consumed yet, by source and seq."""
        return self._unconsumed(kind)

    def draw(self, n: int, seed: int = 0, now: float | None = None, max_share: float = 1.0,
             kind: str = "sft") -> list[dict]:
        """Up to n unconsumed rows of `kind`, sampled by priority without replacement (Efraimidis-Spirakis
        keys u^(1/p)), at most max(1, floor(max_share * n)) from one client (the rest of a client's
        wait for later draws); the same arguments over the same contents give the same draw."""
        rows = self._unconsumed(kind)
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

    def commit(self, keys: list[tuple], update: int, kind: str = "sft") -> int:
        """The rows of `kind` (their `key_of`) were consumed by update number `update`: deleted
        (counted), so the buffer holds only what waits, however many updates ran; idempotent.
        Returns how many rows of `kind` wait."""
        with transaction(self.db):
            before = self.db.total_changes
            self._delete(kind, keys)
            self._count("consumed" if kind == "sft" else f"consumed_{kind}s", self.db.total_changes - before)
        return self.size(kind)

    def stats(self) -> dict:
        counts = dict(self.db.execute("SELECT name, n FROM counts").fetchall())
        corrected = self.db.execute("SELECT count(*) FROM examples WHERE consumed_by IS NULL AND corrected = 1"
                                    ).fetchone()[0]
        return {"unconsumed": self.size(), "unconsumed_corrected": corrected, "consumed": counts.get("consumed", 0),
                "unconsumed_pairs": self.size("pair"), "unconsumed_labels": self.size("label"),
                **{f"{what}_{k}s": counts.get(f"{what}_{k}s", 0) for what in ("consumed", "dropped")
                   for k in ("pair", "label")},
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
