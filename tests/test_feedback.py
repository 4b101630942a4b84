"""FeedbackCollector: stored once per feedback_id, joined to the served completion, PII-masked,
refused with the field named, atomic Parquet export, and nothing acknowledged lost to SIGKILL."""

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
    stored = {r["feedback_id"] for r in FeedbackCollector(path).records()}
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
