"""Aggregation: verdict patterns give the right gold label, escalation and alpha; the loop end to end."""

from __future__ import annotations

import threading
import time

import krippendorff
import numpy as np
import pytest
import redis

from streams.kafka import topics
from streams.review import aggregator
from streams.review.aggregator import Aggregator, alpha, decide, needs_reannotation
from tests.helpers import (
    REVIEW_TOKENS,
    aggregate_until_dead_letters,
    annotation,
    auth,
    publish,
    read_topic,
    review_task,
)


@pytest.mark.parametrize(("votes", "kind", "preferred", "by"), [
    (["chosen", "chosen", "chosen"], "verified", "chosen", "unanimous"),
    (["rejected", "chosen", "rejected"], "verified", "rejected", "majority"),
    (["chosen", "rejected", "tie"], "escalate", None, "split"),
    (["tie", "tie", "chosen"], "verified", "tie", "majority"),  # kept with its verdict (split tie)
    (["invalid", "invalid", "invalid"], "escalate", None, "split"),
    (["both_bad", "chosen", "both_bad"], "verified", "both_bad", "majority"),
])
def test_verdict_patterns(votes, kind, preferred, by):
    d = decide(votes)
    assert (d.kind, d.preferred, d.decided_by) == (kind, preferred, by)


def test_expert_verdict_is_final():
    assert decide(["rejected"], expert=True).preferred == "rejected"
    assert decide(["tie"], expert=True).preferred == "tie"
    assert decide(["invalid"], expert=True).kind == "discarded"


def test_alpha_matches_the_krippendorff_package():
    units = [{"a": "chosen", "b": "chosen", "c": "rejected"}, {"a": "rejected", "b": "rejected", "d": "rejected"},
             {"b": "chosen", "c": "chosen", "d": "tie"}, {"a": "chosen", "c": "chosen", "d": "chosen"}]
    codes = {"chosen": 0, "rejected": 1, "tie": 2}
    raters = ["a", "b", "c", "d"]
    matrix = np.array([[codes[u[r]] if r in u else np.nan for u in units] for r in raters])
    assert alpha(units) == pytest.approx(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"))
    assert alpha([{"a": "chosen", "b": "chosen"}, {"a": "chosen", "b": "chosen"}]) == 1.0


def test_reannotation_share_is_about_five_percent():
    share = sum(needs_reannotation(f"p{i}") for i in range(4000)) / 4000
    assert 0.04 < share < 0.06


def test_majority_gives_verified_and_gold_oriented_by_the_humans(agg):
    a, r, prefix = agg
    t = review_task(1)
    assert a.handle(annotation(t, "x", "rejected"), t) == []
    assert a.handle(annotation(t, "y", "chosen"), t) == []
    out = a.handle(annotation(t, "z", "rejected"), t)
    kinds = {name: rec for name, _, rec in out}
    v, c = kinds["prefs.verified"], kinds["prefs.curated"]
    assert v["label"] == "flipped" and v["decided_by"] == "majority" and v["agreement"] == pytest.approx(2 / 3)
    assert v["pair"]["chosen"] == "bad answer 1" and c["split"] == "gold" and c["pair"]["label_source"] == "human"
    assert a.handle(annotation(t, "z", "rejected"), t) == [], "a replay in the same batch must not decide twice"
    a.committed()
    assert a.handle(annotation(t, "z", "rejected"), t) == [], "a replayed annotation must not decide twice"
    assert r.hget(prefix + "prefstream:review:stats:decided", "x") == b"1"


def test_a_decision_counts_only_once_its_batch_committed(agg):
    """Votes are in Redis at once; the decided mark and the stats wait for the commit (a redone batch decides again)."""
    a, r, prefix = agg
    t = review_task(3)
    a.handle(annotation(t, "x", "chosen"), t)
    a.handle(annotation(t, "y", "chosen"), t)
    first = a.handle(annotation(t, "z", "chosen"), t)
    assert [n for n, _, _ in first] == ["prefs.verified", "prefs.curated"]
    assert not r.exists(prefix + "prefstream:agg:decided:pair-3")  # nothing committed yet
    a.abandoned()  # the transaction aborted, or the process died: the batch is redone from the votes
    again = a.handle(annotation(t, "z", "chosen"), t)
    assert [rec["pair"]["pair_id"] for _, _, rec in again] == ["pair-3", "pair-3"]
    a.committed()
    assert r.exists(prefix + "prefstream:agg:decided:pair-3") and r.ttl(prefix + "prefstream:agg:decided:pair-3") > 0
    assert r.hget(prefix + "prefstream:review:stats:decided", "x") == b"1"  # counted once, not twice


def test_split_escalates_and_the_expert_decides(agg):
    a, r, prefix = agg
    t = review_task(2)
    a.handle(annotation(t, "x", "chosen"), t)
    a.handle(annotation(t, "y", "rejected"), t)
    (name, schema, expert_task), = a.handle(annotation(t, "z", "tie"), t)
    assert name == "prefs.review" and expert_task["expert"] and expert_task["task_id"] == a.task_ids.of("pair-2", "expert")
    out = a.handle(annotation(expert_task, "erin", "chosen", expert=True), expert_task)
    assert [n for n, _, _ in out] == ["prefs.verified", "prefs.curated"]
    assert out[0][2]["decided_by"] == "expert" and out[0][2]["label"] == "kept"


@pytest.mark.integration
def test_three_verdicts_through_the_app_reach_verified_and_curated(settings):
    from fastapi.testclient import TestClient

    from streams.review import aggregator
    from streams.review.app import create_app
    from streams.settings import ReviewSettings

    app = create_app(settings, ReviewSettings(tokens=REVIEW_TOKENS, lease_s=30))
    app.state.queue.redis.set(app.state.queue.k("initialized"), "1")  # no feeder here: the queue counts as built
    stop = threading.Event()
    th = threading.Thread(target=aggregator.run, args=(settings, app.state.queue.redis, stop), daemon=True)
    th.start()
    try:
        with TestClient(app) as c:
            app.state.queue.add(review_task(9))
            for who in ("alice", "bob", "carol"):
                t = c.get("/api/tasks/next", headers=auth(who)).json()
                v = "A" if t["A"] == "good answer 9" else "B"
                assert c.post(f"/api/tasks/{t['task_id']}/verdict", json={"verdict": v}, headers=auth(who)).status_code == 200
        deadline = time.monotonic() + 60
        while not (verified := read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=1)):
            assert time.monotonic() < deadline, "no VerifiedPair appeared"
        assert verified[0]["decided_by"] == "unanimous" and verified[0]["label"] == "kept"
        curated = read_topic(settings, topics.CURATED, "CuratedPair", idle=1)
        assert [x["split"] for x in curated] == ["gold"]
    finally:
        stop.set()
        th.join(10)


class Crash(Exception):
    """Stands in for the process dying at an injected point."""


@pytest.mark.integration
def test_crashes_between_the_redis_write_and_the_commit_leave_one_verified_pair_per_task(settings):
    """The aggregator dies after writing votes but before committing (twice), and after committing but
    before marking the tasks decided (twice); restarted each time, every task ends with one VerifiedPair."""
    from streams.review import aggregator
    from streams.review.app import VerdictIn, annotation
    from streams.review.queue import ReviewQueue

    r = redis.Redis.from_url(settings.redis_url)
    q = ReviewQueue(r, settings.topic_prefix)
    r.set(q.k("initialized"), "1")
    tasks = [review_task(40 + i) for i in range(6)]
    for t in tasks:
        q.add(t)
    publish(settings, "Annotation", topics.ANNOTATIONS,
            [(t["task_id"], annotation(t, who, VerdictIn(verdict="A"), "chosen_first"))
             for t in tasks for who in ("x", "y", "z")])
    plan = {("handled", 1), ("handled", 3), ("committed", 1), ("committed", 4)}  # which calls crash
    seen: dict[str, int] = {}

    def fault(point: str) -> None:
        seen[point] = seen.get(point, 0) + 1
        if (point, seen[point]) in plan:
            raise Crash(point)

    want = {t["task_id"] for t in tasks}
    crashes, deadline = 0, time.monotonic() + 180
    while True:
        stop, box = threading.Event(), {}

        def target(stop=stop, box=box):
            try:  # max_batch=2: many small transactions, so crashes fall between decisions of several tasks
                aggregator.run(settings, r, stop, max_batch=2, fault=fault)
            except Crash as exc:
                box["crash"] = exc

        th = threading.Thread(target=target, daemon=True)
        th.start()  # a restart: a new producer with the same transactional id fences the dead one
        while th.is_alive() and time.monotonic() < deadline:
            th.join(0.5)
            if crashes == len(plan) and {v["pair"]["pair_id"] for v in
                                         read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=0.5)} >= want:
                break
        if "crash" in box:
            crashes += 1
            assert time.monotonic() < deadline, f"still crashing after {crashes}: {seen}"
            continue
        stop.set()
        th.join(15)
        break
    assert crashes == len(plan), f"{crashes} crashes, planned {len(plan)}: {seen}"
    verified = read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=2)
    # Every crash here happens outside an open transaction (before begin or after commit), so no
    # aborted records exist and the raw count is exact. Where a transaction is aborted, the embedded
    # broker (Tansu) still shows its records to read_committed readers: such a test, and every
    # downstream consumer, must dedupe on task_id.
    ids = sorted(v["pair"]["pair_id"] for v in verified)
    assert ids == sorted(t["task_id"] for t in tasks), ids
    assert {tuple(sorted(v["annotators"])) for v in verified} == {("x", "y", "z")}


@pytest.mark.integration
def test_wiping_redis_mid_review_keeps_the_partial_votes(settings):
    """FLUSHDB while tasks have 1 and 2 verdicts: after the feeder's rebuild each needs only the rest."""
    from fastapi.testclient import TestClient

    from streams.review import aggregator
    from streams.review.app import create_app
    from streams.review.feeder import start
    from streams.settings import ReviewSettings

    app = create_app(settings, ReviewSettings(tokens=REVIEW_TOKENS, lease_s=30, rate_per_s=1000))
    q = app.state.queue
    publish(settings, "ReviewTask", topics.REVIEW, [(t["task_id"], t) for t in (review_task(50), review_task(51))])
    feeder, feeder_thread = start(settings, q)
    agg_thread = threading.Thread(target=aggregator.run, args=(settings, q.redis, feeder.stop), daemon=True)
    agg_thread.start()

    def vote(c, who: str, expect: str | None) -> None:
        r = c.get("/api/tasks/next", headers=auth(who))
        if expect is None:
            assert r.status_code == 204, r.text
            return
        assert r.status_code == 200 and r.json()["task_id"] == expect, (who, r.status_code, r.text)
        t = r.json()
        v = "A" if t["A"].startswith("good") else "B"
        assert c.post(f"/api/tasks/{expect}/verdict", json={"verdict": v}, headers=auth(who)).status_code == 200

    def verified() -> list[dict]:
        return read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=1)

    def wait(cond, what: str) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    try:
        with TestClient(app) as c:
            wait(lambda: q.stats()["pending"] == 2, "the feeder did not queue the tasks")
            vote(c, "alice", "pair-50")
            vote(c, "alice", "pair-51")
            vote(c, "bob", "pair-50")  # pair-50 has 2 verdicts, pair-51 has 1
            # Shares the session's Redis: other tests' keys go too, which no later test relies on.
            q.redis.flushdb()
            wait(lambda: q.redis.exists(q.k("initialized")) and q.stats()["pending"] == 2, "the queue was not rebuilt")
            vote(c, "alice", None)  # she has answered both: the rebuild restored who saw what
            vote(c, "bob", "pair-51")
            vote(c, "carol", "pair-50")  # its third verdict: pair-50 is done
            vote(c, "carol", "pair-51")
            vote(c, "dave", None)
            assert q.stats()["pending"] == 0
        deadline = time.monotonic() + 60
        while len({v["pair"]["pair_id"] for v in verified()}) < 2:
            assert time.monotonic() < deadline, f"only {verified()} verified"
        got = verified()
        # Deduped by task: see the Tansu note in the test above.
        by_task = {v["pair"]["pair_id"]: sorted(v["annotators"]) for v in got}
        assert by_task == {"pair-50": ["alice", "bob", "carol"], "pair-51": ["alice", "bob", "carol"]}
    finally:
        feeder.stop.set()
        agg_thread.join(10)
        feeder_thread.join(10)


@pytest.mark.integration
def test_a_batch_handled_while_redis_was_emptied_is_redone_after_the_rebuild(settings):
    """Redis is emptied between the aggregator's check that the queue is built and its handling of a
    batch, and rebuilt by the feeder only later: the verdicts handled against the empty Redis (no task,
    no earlier votes) are redone once the queue is back, so the task still ends verified."""
    from streams.review import aggregator
    from streams.review.app import VerdictIn, annotation
    from streams.review.feeder import Feeder
    from streams.review.queue import ReviewQueue

    r = redis.Redis.from_url(settings.redis_url)
    q = ReviewQueue(r, settings.topic_prefix)
    t = review_task(60)
    publish(settings, "ReviewTask", topics.REVIEW, [(t["task_id"], t)])
    Feeder(settings, q).rebuild_if_empty()  # the queue as the feeder builds it
    assert q.task("pair-60")
    publish(settings, "Annotation", topics.ANNOTATIONS,
            [(t["task_id"], annotation(t, who, VerdictIn(verdict="A"), "chosen_first")) for who in ("x", "y", "z")])
    wiped: list[bool] = []

    def fault(point: str) -> None:
        if point == "batch" and not wiped:
            wiped.append(True)
            r.flushdb()  # shares the session's Redis: other tests' keys go too, which no later test relies on
            threading.Timer(3.0, Feeder(settings, q).rebuild_if_empty).start()

    stop = threading.Event()
    th = threading.Thread(target=aggregator.run, args=(settings, r, stop), kwargs={"fault": fault}, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 60
        while not [v for v in read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=0.5)
                   if v["pair"]["pair_id"] == "pair-60"]:
            assert time.monotonic() < deadline, "pair-60 was never verified: its verdicts were dropped"
    finally:
        stop.set()
        th.join(15)
    assert wiped


# The aggregator as its own process, SIGKILLed right after the commit of the batch that decided a task
# (its note for the task is in Redis, so the decision is in that batch) and before the decided mark.
KILLED_AFTER_COMMIT = """
import os, signal, threading
import redis
from streams.settings import Settings
from streams.review import aggregator

settings = Settings()
r = redis.Redis.from_url(settings.redis_url)

def fault(point):
    if point == "committed" and r.exists(os.environ["DECIDING_KEY"]):
        os.kill(os.getpid(), signal.SIGKILL)

aggregator.run(settings, r, threading.Event(), fault=fault)
"""


@pytest.mark.integration
def test_an_aggregator_killed_between_its_commit_and_its_decided_mark_decides_the_task_once(settings):
    """SIGKILL after the transaction with the task's VerifiedPair committed, before the task is marked
    decided; restarted, a later (fourth) vote on the task must not decide it again."""
    import subprocess
    import sys

    from streams.review.app import VerdictIn, annotation
    from streams.review.queue import ReviewQueue
    from tests.helpers import ROOT, settings_env

    r = redis.Redis.from_url(settings.redis_url)
    q = ReviewQueue(r, settings.topic_prefix)
    r.set(q.k("initialized"), "1")
    t = review_task(70)
    q.add(t)
    decided = f"{settings.topic_prefix}prefstream:agg:decided:{t['task_id']}"
    deciding = f"{settings.topic_prefix}prefstream:agg:deciding:{t['task_id']}"
    publish(settings, "Annotation", topics.ANNOTATIONS,
            [(t["task_id"], annotation(t, who, VerdictIn(verdict="A"), "chosen_first")) for who in ("x", "y", "z")])
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_COMMIT], env=settings_env(settings) | {"DECIDING_KEY": deciding},
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -9, f"the aggregator was not killed at its fault point:\n{proc.stderr[-3000:]}"
    # (Its VerifiedPair is released to readers once a later transaction of the stage shows this one
    # committed: streams/kafka/committed.py. So it is counted after the restart.)
    assert r.exists(deciding) and not r.exists(decided), "the kill fell elsewhere than between commit and mark"

    stop = threading.Event()
    th = threading.Thread(target=aggregator.run, args=(settings, r, stop), daemon=True)
    th.start()
    try:  # a late vote: 4 votes, no decided mark
        publish(settings, "Annotation", topics.ANNOTATIONS,
                [(t["task_id"], annotation(t, "w", VerdictIn(verdict="B"), "chosen_first"))])
        deadline = time.monotonic() + 90
        while not r.exists(decided):
            assert time.monotonic() < deadline and th.is_alive(), "the restarted aggregator never took the late vote"
            time.sleep(0.3)
    finally:
        stop.set()
        th.join(15)
    verified = [v for v in read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=1) if v["pair"]["pair_id"] == "pair-70"]
    curated = [c for c in read_topic(settings, topics.CURATED, "CuratedPair", idle=1) if c["pair"]["pair_id"] == "pair-70"]
    assert len(verified) == 1 and len(curated) == 1, f"decided {len(verified)} times"
    assert sorted(verified[0]["annotators"]) == ["x", "y", "z"]
    # The Redis side of the decision was applied once, from the votes it was made from.
    stats = f"{settings.topic_prefix}prefstream:review:stats:decided"
    assert {k.decode(): int(v) for k, v in r.hgetall(stats).items()} == {"x": 1, "y": 1, "z": 1}
    assert not r.exists(deciding)


@pytest.mark.integration
def test_an_unreadable_annotation_goes_to_the_dlq_with_its_reason(settings):
    """Bytes with no schema header, and an Avro body cut short, each become a DeadLetter naming why, in
    the batch's transaction; the readable verdicts beside them still decide their task."""
    from confluent_kafka import Producer

    from schemas.wire import ValueCodec
    from streams.kafka.config import producer_config
    from streams.review.app import VerdictIn, annotation
    from streams.review.queue import ReviewQueue

    r = redis.Redis.from_url(settings.redis_url)
    q = ReviewQueue(r, settings.topic_prefix)
    r.set(q.k("initialized"), "1")
    t = review_task(71)
    q.add(t)
    value, headers = ValueCodec().encode("Annotation", annotation(t, "x", VerdictIn(verdict="A"), "chosen_first"),
                                         settings.topic(topics.ANNOTATIONS))
    prod = Producer(producer_config(settings))
    prod.produce(settings.topic(topics.ANNOTATIONS), key=b"junk", value=b"\x00not an annotation")
    prod.produce(settings.topic(topics.ANNOTATIONS), key=b"cut", value=value[:5], headers=headers)
    assert prod.flush(10) == 0
    publish(settings, "Annotation", topics.ANNOTATIONS,
            [(t["task_id"], annotation(t, who, VerdictIn(verdict="A"), "chosen_first")) for who in ("x", "y", "z")])
    dead = aggregate_until_dead_letters(settings, r, 2)
    by_key = {d["original_key"]: d for d in dead}
    assert set(by_key) == {b"junk", b"cut"}
    assert by_key[b"junk"]["reason"] == "unknown_schema" and by_key[b"junk"]["original_value"] == b"\x00not an annotation"
    assert by_key[b"cut"]["reason"] and by_key[b"cut"]["original_value"] == value[:5]
    for d in dead:
        assert d["processor"] == "aggregator" and d["source_topic"] == settings.topic(topics.ANNOTATIONS)
        assert "review app" in d["detail"]


def _decide(a: Aggregator, i: int, votes: tuple[str, str, str], category: str) -> None:
    t = review_task(i, task_category=category)
    for who, v in zip("xyz", votes, strict=True):
        a.handle(annotation(t, who, v), t)


def test_the_alpha_window_and_per_category_alpha_survive_a_restart(agg):
    """The window is in Redis, appended with the commit: a new aggregator on the same Redis goes on from it;
    a batch that never committed adds nothing."""
    a, r, prefix = agg
    for i in range(6):
        _decide(a, 100 + i, ("chosen", "chosen", "chosen" if i % 2 else "rejected"), "maths" if i < 3 else "poetry")
    a.committed()
    _decide(a, 200, ("chosen", "rejected", "rejected"), "maths")
    a.abandoned()  # died before its commit: not in the window
    restarted = Aggregator(r, prefix)
    assert list(restarted.window) == list(a.window) and len(restarted.window) == 6
    assert {cat for cat, _ in restarted.window} == {"maths", "poetry"}
    by_cat = {k.decode(): float(v) for k, v in r.hgetall(aggregator.alpha_by_category_key(prefix)).items()}
    assert set(by_cat) == {"maths", "poetry"}
    maths = [votes for cat, votes in a.window if cat == "maths"]
    assert by_cat["maths"] == pytest.approx(alpha(maths), abs=1e-4)


def test_blind_reannotations_count_once_against_the_verified_label(agg):
    a, r, prefix = agg
    r.hset(aggregator.final_key(prefix), mapping={"pair-301": "chosen", "pair-302": "chosen"})
    same, differs = review_task(301), review_task(302)
    a.handle(annotation(same, "w", "chosen", reannotation=True), same)
    a.handle(annotation(differs, "w", "rejected", reannotation=True), differs)
    a.handle(annotation(differs, "w", "rejected", reannotation=True), differs)  # replayed: counted once
    assert aggregator.consistency(r, prefix) == {"same": 1, "different": 1, "agreement": 0.5}
    assert aggregator.consistency(r, prefix + "other.")["agreement"] is None
