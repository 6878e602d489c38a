"""Review queue and annotator API against the real Redis and broker of the test session."""

from __future__ import annotations

import re
import time

import pytest
import redis

from streams.kafka import topics
from streams.review.app import preferred
from tests.helpers import REVIEW_SECRETS, REVIEW_TOKENS, auth, make_client, read_topic, review_task

pytestmark = pytest.mark.integration
@pytest.fixture
def client(settings):
    with make_client(settings) as c:
        yield c


def test_requests_without_a_valid_token_get_401(client):
    assert client.get("/api/tasks/next").status_code == 401
    assert client.get("/api/tasks/next", headers={"Authorization": "Bearer nope-nope-nope"}).status_code == 401
    assert client.post("/api/tasks/x/verdict", json={"verdict": "A"}).status_code == 401


def test_priority_three_distinct_annotators_and_never_twice(client):
    client.queue.add(review_task(1, p=0.4))
    client.queue.add(review_task(2, p=0.1))  # more severe: served first
    first = client.get("/api/tasks/next", headers=auth("alice")).json()
    assert first["task_id"] == "pair-2"
    assert {first["A"], first["B"]} == {"good answer 2", "bad answer 2"}
    r = client.post("/api/tasks/pair-2/verdict", json={"verdict": "A"}, headers=auth("alice"))
    assert r.status_code == 200 and r.json()["votes"] == 1
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task_id"] == "pair-1"  # never pair-2 again
    client.post("/api/tasks/pair-1/verdict", json={"verdict": "A"}, headers=auth("alice"))
    for who in ("bob", "carol"):
        t = client.get("/api/tasks/next", headers=auth(who)).json()
        assert t["task_id"] == "pair-2"
        assert client.post("/api/tasks/pair-2/verdict", json={"verdict": "B"}, headers=auth(who)).status_code == 200
    assert client.get("/api/tasks/next", headers=auth("dave")).json()["task_id"] == "pair-1"  # pair-2 has its 3 votes


def test_verdicts_reach_prefs_annotations_mapped_back_to_the_pair(client, settings):
    client.queue.add(review_task(3))
    t = client.get("/api/tasks/next", headers=auth("alice")).json()
    chose_chosen = "A" if t["A"] == "good answer 3" else "B"
    client.post("/api/tasks/pair-3/verdict", json={"verdict": chose_chosen, "rationale": "<b>right</b>"}, headers=auth("alice"))
    anns = read_topic(settings, topics.ANNOTATIONS, "Annotation")
    assert len(anns) == 1
    a = anns[0]
    assert (a["annotator"], a["pair_id"], a["preferred"], a["rationale"]) == ("alice", "pair-3", "chosen", "<b>right</b>")
    assert a["order"] in ("chosen_first", "rejected_first") and a["verdict"] == chose_chosen


def test_double_submit_is_idempotent_and_others_cannot_submit(client, settings):
    client.queue.add(review_task(4))
    client.get("/api/tasks/next", headers=auth("alice"))
    assert client.post("/api/tasks/pair-4/verdict", json={"verdict": "A"}, headers=auth("bob")).status_code == 403
    one = client.post("/api/tasks/pair-4/verdict", json={"verdict": "A"}, headers=auth("alice")).json()
    two = client.post("/api/tasks/pair-4/verdict", json={"verdict": "B"}, headers=auth("alice")).json()
    assert two["duplicate"] and two["verdict"] == one["verdict"] == "A"
    assert len(read_topic(settings, topics.ANNOTATIONS, "Annotation")) == 1


def test_leases_expire_and_return_the_task(client):
    client.queue.add(review_task(5))
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task_id"] == "pair-5"
    assert client.get("/api/tasks/next", headers=auth("bob")).status_code == 204  # leased to alice
    time.sleep(2.5)
    assert client.get("/api/tasks/next", headers=auth("bob")).json()["task_id"] == "pair-5"
    assert client.post("/api/tasks/pair-5/verdict", json={"verdict": "A"}, headers=auth("alice")).status_code == 403


def test_expert_view_only_for_experts(client):
    client.queue.add(review_task(6, expert=True))
    assert client.get("/api/tasks/next?expert=true", headers=auth("alice")).status_code == 403
    assert client.get("/api/tasks/next", headers=auth("alice")).status_code == 204
    t = client.get("/api/tasks/next?expert=true", headers=auth("erin")).json()
    assert t["expert"] and t["task_id"] == "pair-6"
    r = client.post("/api/tasks/pair-6/verdict", json={"verdict": "tie"}, headers=auth("erin")).json()
    assert r["expert"] and r["preferred"] == "tie"
    assert client.queue.stats()["expert"] == 0  # one expert verdict closes it


def test_pages_escape_user_text(client):
    client.queue.add(review_task(7))
    client.get("/api/tasks/next", headers=auth("alice"))
    client.post("/api/tasks/pair-7/verdict", json={"verdict": "A"}, headers=auth("alice"))
    html = client.get("/stats", headers=auth("bob")).text
    assert "alice" in html and "<script>" not in html.split("</header>")[1].split("<script>")[0]
    page = client.get("/annotate").text
    # Text goes in as text; the only HTML the page inserts is the server's sanitised markdown (render.py).
    assert "textContent" in page and re.findall(r"innerHTML = ([\w.]+)", page) == ["t.A_html", "t.B_html"]


def test_queue_survives_a_redis_restart_and_rebuilds_when_emptied(settings, tmp_path):
    """A private Redis with AOF: restarted, nothing is lost; wiped, the feeder rebuilds from the topics."""
    from confluent_kafka import Producer

    from schemas.wire import ValueCodec
    from streams.embedded import binaries
    from streams.embedded.process import ServerProcess, free_port
    from streams.kafka.config import producer_config
    from streams.review.feeder import Feeder
    from streams.review.queue import ReviewQueue

    port = free_port()
    srv = ServerProcess("redis", tmp_path, "127.0.0.1", port, marker="redis-server")
    argv = [str(binaries.redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--appendonly", "yes", "--appendfsync", "always", "--save", ""]

    def up():
        return srv.start(argv, ready=lambda: _ping(port))

    up()
    try:
        r = redis.Redis(port=port)
        q = ReviewQueue(r, settings.topic_prefix)
        codec, prod = ValueCodec(), Producer(producer_config(settings))
        for i in range(10, 15):
            t = review_task(i)
            v, h = codec.encode("ReviewTask", t, settings.topic(topics.REVIEW))
            prod.produce(settings.topic(topics.REVIEW), key=t["task_id"].encode(), value=v, headers=h)
        prod.flush(10)
        feeder = Feeder(settings, q)
        assert feeder.rebuild_if_empty() == 5 and q.stats()["pending"] == 5
        leased = q.lease("alice")
        q.submit(leased["task_id"], "alice", {"verdict": "A"})
        srv.stop()
        up()
        q2 = ReviewQueue(redis.Redis(port=port), settings.topic_prefix)
        assert q2.stats()["pending"] == 5 and q2.redis.hlen(q2.k("verdicts", leased["task_id"])) == 1
        q2.redis.flushall()
        assert Feeder(settings, q2).rebuild_if_empty() == 5  # annotations topic is empty here: all 5 pending again
        assert q2.stats()["pending"] == 5
    finally:
        srv.stop()


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def test_short_or_malformed_tokens_are_refused_at_start_naming_the_annotator_not_the_token():
    from streams.exceptions import ConfigError
    from streams.review.auth import TokenBook

    with pytest.raises(ConfigError) as err:
        TokenBook("alice:alice-token-0001,bob:short-secret-1")
    msg = str(err.value)
    assert "'bob'" in msg and "short-secret-1" not in msg and "16" in msg and "openssl rand" in msg
    with pytest.raises(ConfigError) as err:
        TokenBook("a-bare-token-with-no-name-0001")
    assert "a-bare-token" not in str(err.value) and "name:token" in str(err.value)
    assert len(TokenBook(REVIEW_TOKENS)) == 5


def test_lease_cap_per_annotator(settings):
    with make_client(settings, max_leases=2) as c:
        for i in range(20, 24):
            c.queue.add(review_task(i))
        held = [c.get("/api/tasks/next", headers=auth("alice")).json()["task_id"] for _ in range(2)]
        third = c.get("/api/tasks/next", headers=auth("alice"))
        assert third.status_code == 409 and "submit a verdict" in third.json()["detail"]
        assert c.get("/api/tasks/next", headers=auth("bob")).status_code == 200  # the cap is per annotator
        assert c.post(f"/api/tasks/{held[0]}/verdict", json={"verdict": "A"}, headers=auth("alice")).status_code == 200
        assert c.get("/api/tasks/next", headers=auth("alice")).status_code == 200  # one answered: room for one more


def test_request_bodies_over_the_limit_get_413(client):
    client.queue.add(review_task(25))
    client.get("/api/tasks/next", headers=auth("alice"))
    big = {"verdict": "A", "rationale": "x" * (70 * 1024)}
    r = client.post("/api/tasks/pair-25/verdict", json=big, headers=auth("alice"))
    assert r.status_code == 413 and "shorter" in r.json()["detail"]

    def chunks():  # no Content-Length: the middleware counts what arrives
        yield b'{"verdict": "A", "rationale": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    r = client.post("/api/tasks/pair-25/verdict", content=chunks(), headers=auth("alice") | {"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    ok = client.post("/api/tasks/pair-25/verdict", json={"verdict": "A", "rationale": "short"}, headers=auth("alice"))
    assert ok.status_code == 200


def test_rate_limit_per_token_gets_429_with_retry_after(settings):
    with make_client(settings, rate_per_s=3) as c:
        codes = [c.get("/api/stats", headers=auth("alice")) for _ in range(10)]
        limited = [r for r in codes if r.status_code == 429]
        # 10 calls span at most two one-second windows, so at most 6 pass.
        assert len(limited) >= 4 and limited[0].headers["Retry-After"] == "1"
        assert "requests per second" in limited[0].json()["detail"]
        assert c.get("/api/stats", headers=auth("bob")).status_code == 200  # per token, not global


def test_stats_need_a_token(client):
    assert client.get("/api/stats").status_code == 401
    assert client.get("/stats").status_code == 401 and "/annotate" in client.get("/stats").text
    assert client.get("/api/stats", headers=auth("dave")).json()["pending"] == 0
    assert client.get("/stats", headers=auth("dave")).status_code == 200
    client.cookies.set("prefstream-token", REVIEW_SECRETS["dave"])  # what the sign-in page sets for /stats
    assert client.get("/stats").status_code == 200
    client.cookies.set("prefstream-token", "not-a-known-token-at-all")
    assert client.get("/stats").status_code == 401


def test_metrics_show_the_queue_for_the_dashboard(client):
    client.queue.add(review_task(1))
    client.queue.add(review_task(2))
    client.queue.add(review_task(3, expert=True))
    text = client.get("/metrics").text
    assert 'prefstream_review_queue_tasks{state="pending"} 2.0' in text
    assert 'prefstream_review_queue_tasks{state="expert"} 1.0' in text


def test_lease_looks_at_a_bounded_window_of_the_queue(stack, stack_settings):
    from streams.review.queue import ReviewQueue

    r = redis.Redis.from_url(stack_settings.redis_url)
    q = ReviewQueue(r, f"scan{time.monotonic_ns()}.", lease_s=30, lease_scan=60)
    for i in range(100):
        q.add(review_task(1000 + i, p=i / 1000))
    for i in range(55):  # alice has seen the first 55: the lease pages past the first 50
        r.sadd(q.k("seen", f"pair-{1000 + i}"), "alice")
    assert q.lease("alice")["task_id"] == "pair-1055"
    for i in range(55, 100):
        r.sadd(q.k("seen", f"pair-{1000 + i}"), "bob")
    for i in range(60):
        r.sadd(q.k("seen", f"pair-{1000 + i}"), "bob")
    assert q.lease("bob") is None  # the first 60 are all seen: the script stops there, not at the end


def test_add_is_one_script_and_decided_keys_expire(stack, stack_settings):
    from streams.review.queue import ReviewQueue

    r = redis.Redis.from_url(stack_settings.redis_url)
    q = ReviewQueue(r, f"ret{time.monotonic_ns()}.", lease_s=30, retention_s=120)
    ReviewQueue(r, f"warm{time.monotonic_ns()}.").add(review_task(59))  # loads the script: the call below is steady state
    calls = []
    real = r.execute_command
    r.execute_command = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    assert q.add(review_task(60)) is True
    assert calls == ["EVALSHA"]  # one atomic round trip: task, queue entry and counter together
    del r.execute_command
    assert q.add(review_task(60)) is False and q.stats()["added"] == 1
    for who in ("a", "b", "c"):
        assert q.lease(who)["task_id"] == "pair-60"
        q.submit("pair-60", who, {"verdict": "A"})
    for key in ("task", "verdicts", "seen"):
        assert 0 < r.ttl(q.k(key, "pair-60")) <= 120, key
    assert q.stats()["pending"] == 0


def test_preferred_maps_display_order_back():
    assert preferred("A", "chosen_first") == "chosen" and preferred("A", "rejected_first") == "rejected"
    assert preferred("B", "chosen_first") == "rejected" and preferred("tie", "rejected_first") == "tie"


def test_a_rebuilt_queue_never_offers_a_task_before_its_earlier_verdicts_are_back(client, settings):
    """After a wipe, a task must not be leasable while its verdicts are still missing, or annotators
    repeat work (and one could be asked twice for the same task); a task with all its verdicts stays closed."""
    from confluent_kafka import Producer

    from schemas.wire import ValueCodec
    from streams.kafka.config import producer_config
    from streams.review.feeder import Feeder

    open_task, done_task = review_task(8), review_task(9, p=0.1)  # pair-9 is served first
    codec, prod = ValueCodec(), Producer(producer_config(settings))
    for t in (open_task, done_task):
        value, headers = codec.encode("ReviewTask", t, settings.topic(topics.REVIEW))
        prod.produce(settings.topic(topics.REVIEW), key=t["task_id"].encode(), value=value, headers=headers)
        client.queue.add(t)
    assert prod.flush(10) == 0
    for who, tid in (("alice", "pair-9"), ("alice", "pair-8"), ("bob", "pair-9"), ("carol", "pair-9")):
        assert client.get("/api/tasks/next", headers=auth(who)).json()["task_id"] == tid
        assert client.post(f"/api/tasks/{tid}/verdict", json={"verdict": "A"}, headers=auth(who)).status_code == 200
    q = client.queue
    q.redis.delete(*q.redis.keys(q.prefix + "*"))  # this test's keys only: the Redis is shared
    offered_right_after_add = []
    add = q.add

    def add_then_lease(t):
        queued = add(t)
        offered_right_after_add.append((q.lease("alice") or {}).get("task_id"))
        return queued

    q.add = add_then_lease
    assert Feeder(settings, q).rebuild_if_empty() == 2
    assert offered_right_after_add == [None, None]  # alice answered both before the wipe
    assert q.stats()["pending"] == 1  # pair-9 had its three verdicts: not queued again
    assert client.get("/api/tasks/next", headers=auth("bob")).json()["task_id"] == "pair-8"
    assert client.get("/api/tasks/next", headers=auth("dave")).status_code == 204  # pair-8 leased to bob, pair-9 closed


def test_a_verdict_restored_while_its_annotator_held_the_lease_frees_the_task_for_others(client):
    """A rebuild can restore an annotator's verdict from the topic while they still hold the lease
    (their POST wrote Kafka before Redis); their submit is then a duplicate and must give the lease back."""
    client.queue.add(review_task(10))
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task_id"] == "pair-10"
    client.queue.restore_verdict("pair-10", "alice", {"verdict": "A", "preferred": "chosen"})
    r = client.post("/api/tasks/pair-10/verdict", json={"verdict": "A"}, headers=auth("alice"))
    assert r.status_code == 200 and r.json()["duplicate"]
    assert client.get("/api/tasks/next", headers=auth("bob")).json()["task_id"] == "pair-10"


def test_a_rebuild_that_redis_loses_halfway_starts_over_instead_of_marking_a_half_queue_done(client, settings):
    from confluent_kafka import Producer

    from schemas.wire import ValueCodec
    from streams.kafka.config import producer_config
    from streams.review.feeder import Feeder

    codec, prod = ValueCodec(), Producer(producer_config(settings))
    for i in (11, 12):
        value, headers = codec.encode("ReviewTask", review_task(i), settings.topic(topics.REVIEW))
        prod.produce(settings.topic(topics.REVIEW), key=f"pair-{i}".encode(), value=value, headers=headers)
    assert prod.flush(10) == 0
    q = client.queue
    add, wiped = q.add, []

    def add_then_wipe_once(t):
        queued = add(t)
        if not wiped:  # Redis restarted empty right after the first task was restored
            wiped.append(q.redis.delete(*q.redis.keys(q.prefix + "*")))
        return queued

    q.add = add_then_wipe_once
    Feeder(settings, q).rebuild_if_empty()
    assert wiped and q.redis.exists(q.k("initialized")) and q.stats()["pending"] == 2 and q.task("pair-11") and q.task("pair-12")


def test_stats_page_and_metrics_show_alpha_by_category_and_reannotation_agreement(client, settings):
    """What the aggregator keeps in Redis reaches the page and /metrics (a restarted app shows it at once)."""
    from streams.review.aggregator import Aggregator, consistency_counts_key

    r = client.queue.redis
    agg = Aggregator(r, settings.topic_prefix)
    for i in range(4):
        t = review_task(400 + i, task_category="cooking" if i < 2 else "history")
        for who in "xyz":
            agg.handle({"task_id": t["task_id"], "annotator": who, "preferred": "chosen" if i % 2 else "rejected"}, t)
    agg.committed()
    r.hset(consistency_counts_key(settings.topic_prefix), mapping={"same": 2, "different": 1})
    html = client.get("/stats", headers=auth("bob")).text
    table = html.split('id="alpha-by-category"')[1].split("</table>")[0]
    assert "<td>cooking</td>" in table and "<td>history</td>" in table
    assert "0.667 (2 of 3)" in html.split('id="reannotation"')[1].split("</td>")[0]
    stats = client.get("/api/stats", headers=auth("bob")).json()
    assert set(stats["alpha_by_category"]) == {"cooking", "history"}
    metrics = client.get("/metrics").text
    assert 'prefstream_annotator_alpha{category="cooking"}' in metrics
    assert "prefstream_reannotation_agreement 0.666" in metrics
