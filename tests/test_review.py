"""Review queue and annotator API against the real Redis and broker of the test session."""

from __future__ import annotations

import time

import pytest
import redis
from fastapi.testclient import TestClient

from schemas.pairs import validate_pair
from streams.kafka import topics
from streams.review.app import create_app, preferred
from streams.settings import ReviewSettings
from tests.helpers import read_topic

pytestmark = pytest.mark.integration
TOKENS = "alice:alice-token-1,bob:bob-token-22,carol:carol-token-3,dave:dave-token-44,erin:expert-token-5"


def auth(name: str) -> dict[str, str]:
    token = {"alice": "alice-token-1", "bob": "bob-token-22", "carol": "carol-token-3", "dave": "dave-token-44",
             "erin": "expert-token-5"}[name]
    return {"Authorization": f"Bearer {token}"}


def task(i: int, p: float = 0.3, expert: bool = False, **pair_extra) -> dict:
    pair = validate_pair({"prompt": f"Question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}",
                          "pair_id": f"pair-{i}"} | pair_extra)
    return {"task_id": f"pair-{i}", "pair": pair, "p": p, "margin": -0.5, "model_version": "bootstrap", "priority": p,
            "reason": "mispredicted", "similar": [], "expert": expert, "created_at": 0}


@pytest.fixture
def client(settings):
    rs = ReviewSettings(tokens=TOKENS, experts="erin", lease_s=2)
    app = create_app(settings, rs)
    with TestClient(app) as c:
        c.queue = app.state.queue
        yield c


def test_requests_without_a_valid_token_get_401(client):
    assert client.get("/api/tasks/next").status_code == 401
    assert client.get("/api/tasks/next", headers={"Authorization": "Bearer nope-nope-nope"}).status_code == 401
    assert client.post("/api/tasks/x/verdict", json={"verdict": "A"}).status_code == 401


def test_priority_three_distinct_annotators_and_never_twice(client):
    client.queue.add(task(1, p=0.4))
    client.queue.add(task(2, p=0.1))  # more severe: served first
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
    client.queue.add(task(3))
    t = client.get("/api/tasks/next", headers=auth("alice")).json()
    chose_chosen = "A" if t["A"] == "good answer 3" else "B"
    client.post("/api/tasks/pair-3/verdict", json={"verdict": chose_chosen, "rationale": "<b>right</b>"}, headers=auth("alice"))
    anns = read_topic(settings, topics.ANNOTATIONS, "Annotation")
    assert len(anns) == 1
    a = anns[0]
    assert (a["annotator"], a["pair_id"], a["preferred"], a["rationale"]) == ("alice", "pair-3", "chosen", "<b>right</b>")
    assert a["order"] in ("chosen_first", "rejected_first") and a["verdict"] == chose_chosen


def test_double_submit_is_idempotent_and_others_cannot_submit(client, settings):
    client.queue.add(task(4))
    client.get("/api/tasks/next", headers=auth("alice"))
    assert client.post("/api/tasks/pair-4/verdict", json={"verdict": "A"}, headers=auth("bob")).status_code == 403
    one = client.post("/api/tasks/pair-4/verdict", json={"verdict": "A"}, headers=auth("alice")).json()
    two = client.post("/api/tasks/pair-4/verdict", json={"verdict": "B"}, headers=auth("alice")).json()
    assert two["duplicate"] and two["verdict"] == one["verdict"] == "A"
    assert len(read_topic(settings, topics.ANNOTATIONS, "Annotation")) == 1


def test_leases_expire_and_return_the_task(client):
    client.queue.add(task(5))
    assert client.get("/api/tasks/next", headers=auth("alice")).json()["task_id"] == "pair-5"
    assert client.get("/api/tasks/next", headers=auth("bob")).status_code == 204  # leased to alice
    time.sleep(2.5)
    assert client.get("/api/tasks/next", headers=auth("bob")).json()["task_id"] == "pair-5"
    assert client.post("/api/tasks/pair-5/verdict", json={"verdict": "A"}, headers=auth("alice")).status_code == 403


def test_expert_view_only_for_experts(client):
    client.queue.add(task(6, expert=True))
    assert client.get("/api/tasks/next?expert=true", headers=auth("alice")).status_code == 403
    assert client.get("/api/tasks/next", headers=auth("alice")).status_code == 204
    t = client.get("/api/tasks/next?expert=true", headers=auth("erin")).json()
    assert t["expert"] and t["task_id"] == "pair-6"
    r = client.post("/api/tasks/pair-6/verdict", json={"verdict": "tie"}, headers=auth("erin")).json()
    assert r["expert"] and r["preferred"] == "tie"
    assert client.queue.stats()["expert"] == 0  # one expert verdict closes it


def test_pages_escape_user_text(client):
    client.queue.add(task(7))
    client.get("/api/tasks/next", headers=auth("alice"))
    client.post("/api/tasks/pair-7/verdict", json={"verdict": "A"}, headers=auth("alice"))
    html = client.get("/stats").text
    assert "alice" in html and "<script>" not in html.split("</header>")[1].split("<script>")[0]
    page = client.get("/annotate").text
    assert "textContent" in page and "innerHTML" not in page


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
            t = task(i)
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
        assert q2.stats()["pending"] == 5 and q2.r.hlen(q2.k("verdicts", leased["task_id"])) == 1
        q2.r.flushall()
        assert Feeder(settings, q2).rebuild_if_empty() == 5  # annotations topic is empty here: all 5 pending again
        assert q2.stats()["pending"] == 5
    finally:
        srv.stop()


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def test_preferred_maps_display_order_back():
    assert preferred("A", "chosen_first") == "chosen" and preferred("A", "rejected_first") == "rejected"
    assert preferred("B", "chosen_first") == "rejected" and preferred("tie", "rejected_first") == "tie"
