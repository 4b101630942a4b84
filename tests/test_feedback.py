"""FeedbackCollector: stored once per feedback_id, joined to the served completion, PII-masked,
refused with the field named, atomic Parquet export, and nothing acknowledged lost to SIGKILL."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from actors.feedback import FeedbackCollector, FeedbackError, shard_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collector(tmp_path, **args) -> FeedbackCollector:
    c = FeedbackCollector(str(tmp_path / "fb" / "collector-0.sqlite"), args)
    c.remember("cmpl-1", "What is the river called?", "The river is blue.", "bf16-step60-abcd1234")
    return c


def test_a_record_is_stored_once_joined_to_its_completion_and_masked(tmp_path):
    c = collector(tmp_path)
    record = {"feedback_id": "fb-1", "completion_id": "cmpl-1", "rating": 2,
              "correction": "It is the Thames; write to ann@example.com", "tags": ["call 555-123-4567"]}
    first = c.submit(record)
    assert first["duplicate"] is False
    assert c.submit(record) == {**first, "duplicate": True}  # a retry: stored once, and told so
    assert c.submit({**record, "rating": "up", "feedback_id": "fb-2"})["duplicate"] is False
    [one, two] = c.records()
    assert one["prompt"] == "What is the river called?" and one["completion"] == "The river is blue."
    assert one["model_version"] == "bf16-step60-abcd1234" and one["rating"] == 2
    assert "ann@example.com" not in one["correction"] and "<EMAIL>" in one["correction"]
    assert one["tags"] == ["call <PHONE>"] and one["pii_masked"] == 2
    assert two["rating"] == 5  # thumbs up: the top of the scale
    assert c.records(after=one["seq"]) == [two]


def test_a_reused_feedback_id_is_a_duplicate_with_its_payload_and_a_409_with_another(tmp_path):
    c = collector(tmp_path)
    c.remember("cmpl-2", "Another question", "Another answer", "bf16-step60-abcd1234")
    record = {"feedback_id": "fb-1", "completion_id": "cmpl-1", "rating": 2, "correction": "mail ann@example.com"}
    c.submit(record)
    assert c.submit(dict(record))["duplicate"] is True  # the same payload: a retry
    for other in ({"rating": 3}, {"correction": "mail bob@example.com, not ann"}, {"completion_id": "cmpl-2"},
                  {"completion_id": "cmpl-404"}, {"tags": ["x"]}):
        with pytest.raises(FeedbackError) as e:
            c.submit({**record, **other})
        assert (e.value.status, e.value.param) == (409, "feedback_id"), other
    assert c.count() == 1


def test_concurrent_posts_of_one_id_through_two_collectors_store_one_record(tmp_path):
    # Eight connections to one store file (actors that each run one call at a time: a restarted
    # one beside its old self, Ray re-running a call), all posting one id at once: SQLite's
    # immediate transactions keep it single.
    first = collector(tmp_path)
    others = [FeedbackCollector(str(tmp_path / "fb" / "collector-0.sqlite")) for _ in range(7)]
    record = {"feedback_id": "fb-race", "completion_id": "cmpl-1", "rating": 4}
    start = threading.Barrier(8)

    def post(c):
        start.wait()
        return c.submit(dict(record))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, [first, *others]))
    assert sum(not r["duplicate"] for r in answers) == 1 and len({r["seq"] for r in answers}) == 1
    assert first.count() == 1


def test_records_come_in_pages_bounded_by_count_and_bytes(tmp_path):
    c = collector(tmp_path)
    for i in range(30):
        c.submit({"feedback_id": f"p-{i}", "completion_id": "cmpl-1", "rating": 1, "correction": "x" * 50})
    assert [r["seq"] for r in c.records(limit=7)] == list(range(1, 8))
    assert [r["seq"] for r in c.records(after=28, limit=7)] == [29, 30] and c.records(after=30) == []
    one_record = sum(len(v) for v in c.records(limit=1)[0].values() if isinstance(v, str)) + len("[]")  # + its tags
    assert len(c.records(max_bytes=3 * one_record)) == 3
    assert len(c.records(max_bytes=1)) == 1  # always at least one: a reader never stalls on a large record
    assert [r["seq"] for r in c.all_records()] == list(range(1, 31))


CANARIES = ["canary.user@example.com", "555-867-5309", "4111 1111 1111 1111", "11010519491231002X", "13812345678"]


def test_no_raw_pii_is_stored_anywhere_in_the_store(tmp_path):
    """Prompts, chat messages, completions, `user`, corrections and tags with e-mail, phone, card
    (Luhn) and ID-number canaries: none is in the SQLite files' bytes, nor in an export."""
    c = FeedbackCollector(str(tmp_path / "fb" / "collector-0.sqlite"))
    text = "; ".join(CANARIES)
    c.remember("cmpl-1", f"My details: {text}", f"Noted: {text}", "v", user=CANARIES[0])
    c.remember("chatcmpl-1", json.dumps([{"role": "user", "content": f"我的电话 {CANARIES[4]}，邮箱 {CANARIES[0]}"}]),
               f"好的 {CANARIES[3]}", "v")
    c.submit({"feedback_id": "a", "completion_id": "cmpl-1", "rating": 1, "correction": text, "tags": [CANARIES[1]]})
    c.submit({"feedback_id": "b", "completion_id": "chatcmpl-1", "rating": "up"})
    [chat] = [r for r in c.records() if r["completion_id"] == "chatcmpl-1"]
    assert json.loads(chat["prompt"])[0]["content"] == "我的电话 <PHONE>，邮箱 <EMAIL>"  # still valid JSON messages
    c.export(str(tmp_path / "fb" / "export.parquet"))
    c.db.close()
    files = list((tmp_path / "fb").iterdir())
    assert len(files) >= 2
    for f in files:
        data = f.read_bytes()
        for canary in CANARIES:
            assert canary.encode() not in data and canary.replace(" ", "").encode() not in data, (f.name, canary)


@pytest.mark.parametrize("record, status, field", [
    ({"completion_id": "cmpl-1", "rating": 3}, 400, "feedback_id"),
    ({"feedback_id": "", "completion_id": "cmpl-1", "rating": 3}, 400, "feedback_id"),
    ({"feedback_id": "x", "completion_id": "cmpl-404", "rating": 3}, 404, "completion_id"),
    ({"feedback_id": "x", "completion_id": "cmpl-1", "rating": 9}, 400, "rating"),
    ({"feedback_id": "x", "completion_id": "cmpl-1", "rating": "meh"}, 400, "rating"),
    ({"feedback_id": "x", "completion_id": "cmpl-1", "rating": True}, 400, "rating"),
    ({"feedback_id": "x", "completion_id": "cmpl-1", "rating": 3, "correction": "y" * 101}, 400, "correction"),
    ({"feedback_id": "x", "completion_id": "cmpl-1", "rating": 3, "tags": ["z" * 101]}, 400, "tags"),
    ({"feedback_id": "x", "completion_id": "cmpl-1", "rating": 3, "mood": "happy"}, 400, "mood"),
    (["not", "an", "object"], 400, "body"),
])
def test_bad_feedback_is_refused_naming_the_field_and_nothing_is_stored(tmp_path, record, status, field):
    c = collector(tmp_path, max_text_chars=100)
    with pytest.raises(FeedbackError) as e:
        c.submit(record)
    assert (e.value.status, e.value.param) == (status, field) and field in e.value.message
    assert c.count() == 0


def test_only_the_newest_completions_are_kept(tmp_path):
    c = collector(tmp_path, retention=3)
    for i in range(2, 7):
        c.remember(f"cmpl-{i}", f"prompt {i}", f"answer {i}", "v")
    with pytest.raises(FeedbackError, match="cmpl-3"):
        c.submit({"feedback_id": "a", "completion_id": "cmpl-3", "rating": 1})
    assert c.submit({"feedback_id": "b", "completion_id": "cmpl-4", "rating": 1})["duplicate"] is False


def test_completions_older_than_the_retention_time_are_forgotten(tmp_path):
    c = collector(tmp_path, retention_s=60)
    c.db.execute("UPDATE completions SET created = created - 61 WHERE completion_id = 'cmpl-1'")  # a minute ago
    c.remember("cmpl-2", "prompt", "answer", "v")  # each remember forgets what is too old
    with pytest.raises(FeedbackError, match="cmpl-1") as e:
        c.submit({"feedback_id": "a", "completion_id": "cmpl-1", "rating": 1})
    assert e.value.status == 404 and "60 s" in e.value.message
    assert c.submit({"feedback_id": "b", "completion_id": "cmpl-2", "rating": 1})["duplicate"] is False


def test_export_writes_every_record_as_parquet_in_one_rename(tmp_path):
    c = collector(tmp_path)
    for i in range(5):
        c.submit({"feedback_id": f"fb-{i}", "completion_id": "cmpl-1", "rating": 1 + i % 5})
    out = tmp_path / "export" / "feedback.parquet"
    assert c.export(str(out)) == 5
    table = pq.read_table(out)
    assert table.column("feedback_id").to_pylist() == [f"fb-{i}" for i in range(5)]
    assert table.column("prompt").to_pylist() == ["What is the river called?"] * 5
    assert os.listdir(out.parent) == ["feedback.parquet"]  # no temporary file left behind


def test_ids_shard_stably_over_collectors():
    ids = [f"fb-{i}" for i in range(400)]
    shards = [shard_of(i, 4) for i in ids]
    assert shards == [shard_of(i, 4) for i in ids] and set(shards) == {0, 1, 2, 3}


WRITER = textwrap.dedent("""
    import sys
    from actors.feedback import FeedbackCollector
    c = FeedbackCollector(sys.argv[1])
    for i in range(int(sys.argv[2]), 10**6):
        c.submit({"feedback_id": f"fb-{i}", "completion_id": "cmpl-1", "rating": 1 + i % 5,
                  "correction": "a corrected answer " * 20})
        print(i, flush=True)  # acknowledged: the commit returned
""")


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_loses_no_acknowledged_record(tmp_path):
    c = collector(tmp_path)
    path, acknowledged, rng = c.path, [], random.Random(0)
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(len(acknowledged) and acknowledged[-1] + 1)],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        lines: list[int] = []
        reader = threading.Thread(target=lambda: lines.extend(int(x) for x in writer.stdout))
        reader.start()
        while not lines:  # started writing
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        reader.join()
        acknowledged += lines
    stored = {r["feedback_id"] for r in FeedbackCollector(path).all_records()}
    assert len(acknowledged) > 20 and {f"fb-{i}" for i in acknowledged} <= stored
    assert len(stored) <= len(acknowledged) + 4  # at most the one in flight per kill
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_500_posts_with_the_collector_killed_twice_are_stored_exactly_once(tmp_path):
    import ray
    from ray.exceptions import RayActorError

    from actors.feedback import FeedbackCollectorActor

    actor = FeedbackCollectorActor.options(num_cpus=0.1).remote(str(tmp_path / "fb.sqlite"))
    ray.get(actor.remember.remote("cmpl-1", "p", "c", "v"))
    pid = lambda: ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))  # noqa: E731
    answers, retried, killed = [], [], []

    def post(i):
        record = {"feedback_id": f"fb-{i}", "completion_id": "cmpl-1", "rating": 1 + i % 5}
        for _ in range(30):  # a client that retries until it gets an answer
            try:
                return ray.get(actor.submit.remote(record), timeout=60)
            except (RayActorError, ray.exceptions.GetTimeoutError) as e:
                retried.append(repr(e))
                time.sleep(0.2)
        raise AssertionError(f"feedback {i} was never acknowledged")

    def killer():
        for at in (120, 320):
            while len(answers) < at:
                time.sleep(0.005)
            killed.append(pid())
            os.kill(killed[-1], signal.SIGKILL)

    victims = threading.Thread(target=killer)
    victims.start()
    with ThreadPoolExecutor(8) as pool:
        for a in pool.map(post, range(500)):
            answers.append(a)
    victims.join()
    assert len(set(killed)) == 2 and pid() not in killed  # two different processes died; Ray restarted it
    assert len(answers) == 500 and {a["feedback_id"] for a in answers} == {f"fb-{i}" for i in range(500)}
    assert ray.get(actor.count.remote()) == 500 and ray.get(actor.integrity.remote()) == "ok"
    # Ray re-ran calls the killed actor had already committed: those came back as duplicates.
    assert sorted(a["seq"] for a in answers) == sorted({a["seq"] for a in answers})
