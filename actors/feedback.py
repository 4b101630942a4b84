"""FeedbackCollector: a durable, idempotent store of user feedback, one SQLite file in WAL mode.

A record is acknowledged only after its transaction committed with `synchronous=FULL`, so an
acknowledged record survives a crash of the process (or of the machine) at any moment. The client's
`feedback_id` is the key: the same id sent again (a client retry, or Ray re-running a call that a
killed actor had already committed) is stored once and answered `duplicate: true`.

Feedback refers to a completion by id. The server calls `remember` with every completion it
returns (the newest `feedback.retention` are kept), and a stored record carries that prompt,
completion and model version, so later stages need nothing else. Every text is PII-masked with the
curation stage's rules before it is stored: prompts, chat messages, completions, `user`, corrected
answers and tags; no table (and so no export or replay example) ever holds the raw text.

Several collectors can run: `shard_of(key, n)` says which one owns a key; a completion is kept by the
one its completion_id hashes to, and feedback is stored by the one its feedback_id hashes to (with the
completion looked up where it is kept), so a feedback_id is unique across collectors. A restarted actor runs `__init__` again and reopens the same file; `export` writes
a Parquet snapshot atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pydantic
import ray

from deepkiln.config import Config, FeedbackArgs
from deepkiln.corpus import write_atomic
from deepkiln.paths import RunPaths
from deepkiln.text import mask_pii

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    completion_id TEXT PRIMARY KEY, prompt TEXT NOT NULL, completion TEXT NOT NULL,
    model_version TEXT NOT NULL, created REAL NOT NULL, user TEXT);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, feedback_id TEXT NOT NULL UNIQUE, completion_id TEXT NOT NULL,
    rating INTEGER NOT NULL, correction TEXT, tags TEXT NOT NULL, prompt TEXT NOT NULL,
    completion TEXT NOT NULL, model_version TEXT NOT NULL, pii_masked INTEGER NOT NULL, created REAL NOT NULL,
    user TEXT, client TEXT);
"""
PAGE_RECORDS, PAGE_BYTES = 1000, 8 << 20  # one `records` call: at most this many records, about this much text
COLUMNS = ["seq", "feedback_id", "completion_id", "rating", "correction", "tags", "prompt", "completion",
           "model_version", "pii_masked", "created", "user", "client"]


class FeedbackError(ValueError):
    """Feedback that can't be stored: `status` is the HTTP status it deserves, `param` the field."""

    def __init__(self, status: int, message: str, param: str):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def __reduce__(self):  # crosses Ray's process boundary whole (the default pickles only the message)
        return FeedbackError, (self.status, self.message, self.param)


class Feedback(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    feedback_id: str = pydantic.Field(min_length=1, max_length=128)
    completion_id: str = pydantic.Field(min_length=1, max_length=128)
    rating: int | Literal["up", "down"]
    correction: str | None = None
    tags: list[str] = []


@contextlib.contextmanager
def transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception (also the ReplayBuffer's)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def shard_of(key: str, collectors: int) -> int:
    """The collector that owns `key` (stable across processes and restarts). The server shards by
    completion id: a completion and the feedback on it meet in one collector."""
    return zlib.crc32(key.encode()) % collectors


def mask_prompt(prompt: str) -> str:
    """A completion's prompt, PII masked: plain text, or a chat's messages as JSON (each message's
    content masked, the JSON kept valid)."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        messages = None
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return json.dumps([{**m, "content": mask_pii(m["content"])[0]} for m in messages])
    return mask_pii(prompt)[0]


class FeedbackCollector:
    def __init__(self, path: str, args: dict | None = None):
        self.args = FeedbackArgs(**(args or {}))
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit is on disk when it returns
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)
        for table, column in (("completions", "user"), ("feedback", "user"), ("feedback", "client")):
            if column not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")  # a store from before it
        saved = self.db.execute("SELECT value FROM settings WHERE key = 'feedback'").fetchone()
        if saved:  # the settings Serve configured last outlive a restart (which re-runs __init__ with the first ones)
            self.args = FeedbackArgs(**json.loads(saved[0]))

    def configure(self, args: dict) -> None:
        """The limits and retention to apply from now on (Serve's feedback.* settings), kept in the file."""
        self.args = FeedbackArgs(**args)
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO settings VALUES ('feedback', ?)", (json.dumps(args, sort_keys=True),))

    def remember(self, completion_id: str, prompt: str, completion: str, model_version: str,
                 user: str | None = None) -> None:
        """Keep a served completion (and the `user` the client named) for feedback to refer to, PII
        masked (nothing raw is ever written: feedback, the replay buffer and exports copy these);
        forget those beyond feedback.retention (a count) or older than feedback.retention_s."""
        prompt, completion = mask_prompt(prompt), mask_pii(completion)[0]
        user = mask_pii(user)[0] if user is not None else None
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO completions (completion_id, prompt, completion, model_version, "
                            "created, user) VALUES (?, ?, ?, ?, ?, ?)",
                            (completion_id, prompt, completion, model_version, time.time(), user))
            self.db.execute("DELETE FROM completions WHERE rowid <= (SELECT max(rowid) FROM completions) - ? "
                            "OR created < ?", (self.args.retention, time.time() - self.args.retention_s))

    def served(self, completion_id: str) -> tuple | None:
        """(prompt, completion, model_version, user) of a completion this collector keeps, or None."""
        return self.db.execute("SELECT prompt, completion, model_version, user FROM completions "
                               "WHERE completion_id = ?", (completion_id,)).fetchone()

    def submit(self, record: dict, served: tuple | None = None, client: str = "anonymous") -> dict:
        """Validate, mask and commit one feedback record. Returns {"feedback_id", "seq", "duplicate"}:
        the same feedback_id with the same payload again is a duplicate (stored once); with another
        payload it is a FeedbackError 409. Raises FeedbackError (nothing stored) for bad input or an
        unknown completion id. `served`: the completion, looked up in the collector that keeps it
        when that is another one (the ingress stores feedback in the collector its feedback_id
        hashes to, so an id is unique across collectors). `client`: who posted it (the ingress
        names the API key's hash), stored for online.max_share_per_source."""
        fb = self._validate(record)
        correction, masked = (mask_pii(fb.correction) if fb.correction is not None else (None, {}))
        tags = [mask_pii(t) for t in fb.tags]
        n_masked = sum(masked.values()) + sum(sum(c.values()) for _, c in tags)
        rating = {"up": self.args.rating_max, "down": self.args.rating_min}.get(fb.rating, fb.rating)
        payload = (fb.completion_id, rating, correction, [t for t, _ in tags])
        with transaction(self.db):
            row = self.db.execute("SELECT seq, completion_id, rating, correction, tags FROM feedback "
                                  "WHERE feedback_id = ?", (fb.feedback_id,)).fetchone()
            if row:
                if (row[1], row[2], row[3], json.loads(row[4])) != payload:
                    raise FeedbackError(409, f"feedback_id {fb.feedback_id!r} is stored already with another payload "
                                        "(completion_id, rating, correction or tags): use a new feedback_id",
                                        "feedback_id")
                return {"feedback_id": fb.feedback_id, "seq": row[0], "duplicate": True}
            served = served or self.served(fb.completion_id)
            if served is None:
                raise FeedbackError(404, f"completion_id {fb.completion_id!r} is unknown (or no longer kept: the "
                                    f"last {self.args.retention} completions of at most {self.args.retention_s:g} s "
                                    "are)", "completion_id")
            prompt, completion, version, user = served
            cur = self.db.execute(
                "INSERT INTO feedback (feedback_id, completion_id, rating, correction, tags, prompt, completion, "
                "model_version, pii_masked, created, user, client) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (fb.feedback_id, fb.completion_id, rating, correction, json.dumps(payload[3]),
                 prompt, completion, version, n_masked, time.time(), user, client))
            return {"feedback_id": fb.feedback_id, "seq": cur.lastrowid, "duplicate": False}

    def _validate(self, record: dict) -> Feedback:
        if not isinstance(record, dict):
            raise FeedbackError(400, "the body must be a JSON object", "body")
        try:
            fb = Feedback.model_validate(record)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"][:1]) or "body"
            raise FeedbackError(400, f"{field}: {err['msg']}", field) from None
        a = self.args
        if isinstance(fb.rating, int) and not a.rating_min <= fb.rating <= a.rating_max:
            raise FeedbackError(400, f"rating={fb.rating} is outside the scale {a.rating_min}..{a.rating_max} "
                                "(or 'up'/'down')", "rating")
        if fb.correction is not None and len(fb.correction) > a.max_text_chars:
            raise FeedbackError(400, f"correction has {len(fb.correction)} characters; the limit is "
                                f"{a.max_text_chars} (feedback.max_text_chars)", "correction")
        if sum(len(t) for t in fb.tags) > a.max_text_chars:
            raise FeedbackError(400, f"tags exceed {a.max_text_chars} characters (feedback.max_text_chars)", "tags")
        return fb

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM feedback").fetchone()[0]

    def records(self, after: int = 0, limit: int = PAGE_RECORDS, max_bytes: int = PAGE_BYTES) -> list[dict]:
        """One page of stored records with seq > `after`, oldest first: at most `limit` records and
        about `max_bytes` of text (always at least one record when there is one). A reader pages on
        from the last seq it got, until a page is empty."""
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM feedback WHERE seq > ? ORDER BY seq LIMIT ?",
                               (after, limit))
        page, size = [], 0
        for r in rows:
            size += sum(len(v) for v in r if isinstance(v, str))
            if page and size > max_bytes:
                break
            page.append(dict(zip(COLUMNS, r)) | {"tags": json.loads(r[5])})
        return page

    def all_records(self):
        """Every record, page by page (a generator, for this process's own use)."""
        after = 0
        while page := self.records(after):
            yield from page
            after = page[-1]["seq"]

    def integrity(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]

    def export(self, path: str) -> int:
        """Every record as a Parquet file at `path` (local or a pyarrow.fs URI), written under a
        temporary name, fsynced and renamed: a reader sees the old file or the new one, never half."""
        records = list(self.all_records())
        table = pa.Table.from_pylist(records, schema=pa.schema(
            [("seq", pa.int64()), ("feedback_id", pa.string()), ("completion_id", pa.string()),
             ("rating", pa.int64()), ("correction", pa.string()), ("tags", pa.list_(pa.string())),
             ("prompt", pa.string()), ("completion", pa.string()), ("model_version", pa.string()),
             ("pii_masked", pa.int64()), ("created", pa.float64()), ("user", pa.string()),
             ("client", pa.string())]))
        write_atomic(path, table)
        return len(records)


# Restarted after a crash, with calls in flight re-run: feedback_id makes the re-run harmless.
FeedbackCollectorActor = ray.remote(max_restarts=-1, max_task_retries=-1)(FeedbackCollector)


def head_node():
    """Scheduling on the head node (where the stores' SQLite files and their WAL live: SQLite's WAL
    needs the processes that open a file on one host)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    return NodeAffinitySchedulingStrategy(heads[0], soft=False) if heads else "DEFAULT"


def collectors(cfg: Config, configure: bool = False) -> list:
    """Handles of the run's collectors, started on first use on the head node: one detached actor
    per store file, named after its resolved path alone, so Serve's ingress replicas (and restarted
    ones) and the online loop share it. `configure`: apply this config's feedback.* settings (Serve
    does; readers such as the online loop leave them)."""
    handles, args = [], cfg.feedback.model_dump()
    for i in range(cfg.feedback.collectors):
        path = str(Path(RunPaths.of(cfg).collector_db(i)).resolve())
        name = f"deepkiln-feedback-{hashlib.sha1(path.encode()).hexdigest()[:16]}"
        handle = FeedbackCollectorActor.options(
            name=name, namespace="deepkiln", lifetime="detached", get_if_exists=True, num_cpus=0,
            scheduling_strategy=head_node()).remote(path, args)
        if configure:
            ray.get(handle.configure.remote(args))
        handles.append(handle)
    return handles
