"""ReplayBuffer: examples from feedback, ingested exactly once per offset, bounded by priority,
drawn by priority without repeats, consumed on commit, and exactly the unconsumed ones after a kill."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest

from actors.replay import ReplayBuffer, example_of, key_of
from deepkiln.config import FeedbackArgs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOW = time.time()


def record(seq, rating=3, correction=None, age=0.0, completion="an answer"):
    return {"seq": seq, "completion_id": f"cmpl-{seq}", "prompt": f"prompt {seq}", "completion": completion,
            "correction": correction, "rating": rating, "model_version": "v0", "created": NOW - age}


def test_corrections_and_good_ratings_teach_thumbs_down_alone_does_not():
    scale = FeedbackArgs()  # 1..5
    assert example_of(record(1, rating=1, correction="fixed"), scale) == ("fixed", 1.0, True)
    assert example_of(record(2, rating=5), scale) == ("an answer", 1.0, False)
    assert example_of(record(3, rating=4), scale) == ("an answer", 0.5, False)
    assert example_of(record(4, rating=3), scale) is None and example_of(record(5, rating=1), scale) is None


def test_ingest_takes_each_record_once_and_offsets_move_with_it(tmp_path):
    buf = ReplayBuffer(str(tmp_path / "replay.sqlite"))
    batch = [record(i, rating=5) for i in range(1, 6)] + [record(6, rating=1)]
    assert buf.ingest("c0", batch) == {"added": 5, "not_trainable": 1, "dropped": 0}
    assert buf.ingest("c0", batch)["added"] == 0  # the same records again (a retried call)
    assert buf.offset("c0") == 6 and buf.offset("c1") == 0 and buf.size() == 5
    assert buf.ingest("c1", [record(1, correction="x")])["added"] == 1  # sources are separate
    assert buf.stats()["offsets"] == {"c0": 6, "c1": 1}


def test_pairs_and_labels_are_kept_beside_sft_examples_and_consumed_on_their_own(tmp_path):
    buf = ReplayBuffer(str(tmp_path / "replay.sqlite"))
    same = {"prompt": "shared prompt"}
    buf.ingest("c0", [record(1, rating=1, correction="fixed"), record(2, rating=1),   # thumbs down alone
                      record(3, rating=5, completion="great") | same, record(4, rating=2, completion="weak") | same,
                      record(5, rating=3, completion="so-so") | same])
    pairs = {(p["chosen"], p["rejected"], p["part"]) for p in buf.unconsumed("pair")}
    assert pairs == {("fixed", "an answer", "correction"), ("great", "weak", "c0:3"), ("great", "so-so", "c0:3"),
                     ("so-so", "weak", "c0:4")}
    labels = {(lab["seq"], lab["chosen"], lab["desirable"]) for lab in buf.unconsumed("label")}
    assert labels == {(1, "fixed", 1), (1, "an answer", 0), (2, "an answer", 0), (3, "great", 1), (4, "weak", 0)}
    assert buf.size() == 2  # the correction and the 5: the supervised examples are as before
    drawn = buf.draw(10, seed=0, kind="pair")
    assert len(drawn) == 4 and buf.commit([key_of(p) for p in drawn], 1, kind="pair") == 0
    assert buf.size() == 2 and buf.size("label") == 5
    stats = buf.stats()
    assert stats["consumed_pairs"] == 4 and stats["consumed"] == 0 and stats["unconsumed_labels"] == 5
    with pytest.raises(ValueError, match="kind='pairs'"):
        buf.draw(1, kind="pairs")


def test_capacity_drops_the_lowest_priority_first(tmp_path):
    buf = ReplayBuffer(str(tmp_path / "replay.sqlite"), {"buffer_size": 3, "half_life_s": 100.0})
    buf.ingest("c0", [record(1, rating=4, age=0), record(2, correction="c", age=500),
                      record(3, correction="c", age=0), record(4, rating=5, age=10), record(5, rating=4, age=200)])
    # priorities: 0.5, 1 * 2^-5, 1.0, 1 * 2^-0.1, 0.5 * 2^-2
    assert [r["seq"] for r in buf.unconsumed()] == [1, 3, 4] and buf.stats()["dropped"] == 2


def test_one_client_gets_at_most_its_share_of_a_draw(tmp_path):
    buf = ReplayBuffer(str(tmp_path / "replay.sqlite"))
    buf.ingest("c0", [record(i, correction="c") | {"client": "key-flood"} for i in range(1, 21)]
               + [record(i, correction="c") | {"client": "key-b"} for i in range(21, 23)]
               + [record(23, correction="c")])  # posted without a key: "anonymous"
    draw = buf.draw(8, seed=0, max_share=0.5)
    assert Counter(r["client"] for r in draw) == {"key-flood": 4, "key-b": 2, "anonymous": 1}
    assert Counter(r["client"] for r in buf.draw(8, seed=0))["key-flood"] >= 5  # unbounded: the flood wins
    buf.commit([(r["source"], r["seq"]) for r in draw], 1)
    assert Counter(r["client"] for r in buf.draw(8, seed=1, max_share=0.5)) == {"key-flood": 4}  # the rest wait


def test_draw_is_seeded_without_repeats_prefers_priority_and_commit_consumes(tmp_path):
    buf = ReplayBuffer(str(tmp_path / "replay.sqlite"), {"half_life_s": 3600.0})
    buf.ingest("c0", [record(i, correction="c", age=0) for i in range(1, 11)]
               + [record(i, rating=4, age=7200) for i in range(11, 21)])  # weight 0.5, two half-lives old
    draw = buf.draw(8, seed=1, now=NOW)
    assert draw == buf.draw(8, seed=1, now=NOW) and len({(r["source"], r["seq"]) for r in draw}) == 8
    firsts = Counter(buf.draw(1, seed=s, now=NOW)[0]["seq"] <= 10 for s in range(400))
    assert firsts[True] / 400 > 0.85  # priority 1 against 0.125: 8/9 of first picks expected
    assert buf.commit([(r["source"], r["seq"]) for r in draw], update=1) == 12
    assert buf.commit([(r["source"], r["seq"]) for r in draw], update=2) == 12  # idempotent
    left = {(r["source"], r["seq"]) for r in buf.unconsumed()}
    assert left.isdisjoint({(r["source"], r["seq"]) for r in draw})
    assert {(r["source"], r["seq"]) for r in buf.draw(100, seed=3, now=NOW)} == left


INGESTER = textwrap.dedent("""
    import sys, time
    from actors.replay import ReplayBuffer
    buf = ReplayBuffer(sys.argv[1])
    while True:
        start = buf.offset("c0") + 1
        buf.ingest("c0", [{"seq": s, "completion_id": f"cmpl-{s}", "prompt": "p" * 200, "completion": "a",
                           "correction": "fixed " * 50, "rating": 1, "model_version": "v", "created": time.time()}
                          for s in range(start, start + 7)])
        print(buf.offset("c0"), flush=True)
""")


@pytest.mark.slow
def test_an_ingester_killed_at_random_moments_leaves_offsets_and_examples_in_step(tmp_path):
    path, rng, acknowledged = str(tmp_path / "replay.sqlite"), random.Random(0), 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", INGESTER, path], cwd=REPO, stdout=subprocess.PIPE, text=True)
        lines: list[int] = []
        reader = threading.Thread(target=lambda: lines.extend(int(x) for x in proc.stdout))
        reader.start()
        while not lines:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join()
        acknowledged = max(acknowledged, lines[-1])
        buf = ReplayBuffer(path)
        seqs = [r["seq"] for r in buf.unconsumed()]
        # every record up to the offset is there once, nothing beyond it: a re-ingest from the offset
        # takes each record exactly once
        assert seqs == list(range(1, buf.offset("c0") + 1)) and buf.offset("c0") >= acknowledged
    assert acknowledged > 50


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_the_actor_rebuilt_after_a_kill_holds_exactly_the_unconsumed_examples(tmp_path):
    import ray

    from actors.replay import ReplayBufferActor

    actor = ReplayBufferActor.options(num_cpus=0.1).remote(str(tmp_path / "replay.sqlite"))
    ray.get(actor.ingest.remote("c0", [record(i, correction=f"fix {i}") for i in range(1, 51)]))
    drawn = ray.get(actor.draw.remote(20, 7))
    ray.get(actor.commit.remote([(r["source"], r["seq"]) for r in drawn[:10]], 1))
    expected = {i for i in range(1, 51)} - {r["seq"] for r in drawn[:10]}
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # Ray restarts it: __init__ reopens the store
        try:
            left = ray.get(actor.unconsumed.remote(), timeout=30)
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
    assert {r["seq"] for r in left} == expected and len(left) == 40
    assert ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) != pid
    assert ray.get(actor.stats.remote())["consumed"] == 10
