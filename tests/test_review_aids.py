"""What a served review task carries to help the annotator: the margin and p in the annotator's own A/B
order, the similar pairs' human labels, and the optional LLM judge's opinion (never a vote).

Against the real Redis and broker of the test session, and a real local HTTP server in the
OpenAI chat-completions shape standing in for the judge (tests/fake_llm.py).
"""

from __future__ import annotations

import logging
import re
import time

import pytest

from streams.kafka import topics
from streams.review.aggregator import Aggregator
from tests.fake_llm import FakeJudge
from tests.helpers import auth, make_client, read_topic, review_task

pytestmark = pytest.mark.integration


@pytest.fixture
def client(settings):
    with make_client(settings) as c:
        yield c


def similar(i: int) -> dict:
    return {"pair_id": f"pair-{i}", "prompt": f"Question {i}?", "chosen": f"good answer {i}",
            "rejected": f"bad answer {i}", "label_source": "human", "similarity": 0.9}


def ann(tid: str, who: str, preferred: str, expert: bool = False) -> dict:
    return {"task_id": tid, "annotator": who, "preferred": preferred, "expert": expert, "reannotation": False,
            "rationale": None}


def in_order(client, tid: str, orders: dict[str, str]) -> None:
    """Fix each annotator's A/B order of a task before they are served it (the app keeps the first one set)."""
    for who, order in orders.items():
        client.queue.redis.set(client.queue.k("order", tid, who), order)


def next_task(client, who: str) -> dict:
    r = client.get("/api/tasks/next", headers=auth(who))
    assert r.status_code == 200, r.text
    return r.json()


def answer(client, who: str, tid: str, verdict: str = "A") -> None:
    """Submit ``who``'s verdict, so the task's lease is free for the next annotator."""
    assert client.post(f"/api/tasks/{tid}/verdict", json={"verdict": verdict}, headers=auth(who)).status_code == 200


def test_margin_and_p_read_in_the_annotators_order(client):
    client.queue.add(review_task(30, p=0.3) | {"margin": -0.5})
    in_order(client, "pair-30", {"alice": "chosen_first", "bob": "rejected_first"})
    a = next_task(client, "alice")
    assert (a["A"], a["margin"], a["p"]) == ("good answer 30", -0.5, 0.3)  # reward(chosen) - reward(rejected)
    answer(client, "alice", "pair-30")
    b = next_task(client, "bob")
    assert b["A"] == "bad answer 30" and b["margin"] == 0.5 and b["p"] == pytest.approx(0.7)  # A is the rejected one
    assert a["judge"] is None and not a["judge_pending"]  # no judge configured


def test_similar_pairs_carry_the_label_the_humans_gave_them_when_served(client, settings):
    """Labels are read at serve time: pair-41, verified after the task was made, shows on the next serve."""
    client.queue.add(review_task(40) | {"similar": [similar(41), similar(42), similar(43)]})
    assert [s["verified"] for s in next_task(client, "alice")["similar"]] == [None, None, None]
    answer(client, "alice", "pair-40")
    agg = Aggregator(client.queue.redis, settings.topic_prefix)
    # The similar pairs' review tasks, with the ids the worker gives them (streams/review/task_ids.py).
    t41, t43 = (review_task(i) | {"task_id": agg.task_ids.of(f"pair-{i}")} for i in (41, 43))
    for who, side in (("x", "rejected"), ("y", "rejected"), ("z", "chosen")):  # a majority for the shown "rejected"
        agg.handle(ann(t41["task_id"], who, side), task=t41)
    [(_, _, expert_task)] = [agg.handle(ann(t43["task_id"], who, side), task=t43)
                             for who, side in (("x", "chosen"), ("y", "rejected"), ("z", "tie"))][-1]
    agg.handle(ann(expert_task["task_id"], "erin", "chosen", expert=True), task=expert_task)
    agg.committed()
    sim = {s["pair_id"]: s for s in next_task(client, "bob")["similar"]}
    assert sim["pair-41"]["verified"] == {"preferred": "rejected", "verdicts": 3, "agreeing": 2, "expert": False}
    assert sim["pair-41"]["chosen"] == "good answer 41"  # the label is relative to the texts shown with it
    assert sim["pair-42"]["verified"] is None  # never verified: nothing shown
    assert sim["pair-43"]["verified"] == {"preferred": "chosen", "verdicts": 3, "agreeing": 1, "expert": True}
    answer(client, "bob", "pair-40")
    client.queue.redis.delete(f"{agg.prefix}votes:{t41['task_id']}")  # the votes expired after the retention period
    assert next_task(client, "carol")["similar"][0]["verified"] == {"preferred": "rejected", "verdicts": None,
                                                                     "agreeing": None, "expert": None}


@pytest.fixture
def judge():
    fake = FakeJudge(rationale="<b>Response {n}</b> answers the question.")
    yield fake
    fake.close()


def test_the_judge_aid_is_shown_in_each_annotators_order_and_is_never_a_vote(settings, judge):
    with make_client(settings, judge_url=judge.url, judge_model="judge-7b", judge_api_key="judge-key-1",
                     judge_wait_s=30) as c:
        c.queue.add(review_task(50))
        in_order(c, "pair-50", {"alice": "chosen_first", "bob": "rejected_first", "carol": "chosen_first"})
        seen = {}
        for who in ("alice", "bob", "carol"):
            seen[who] = next_task(c, who)
            answer(c, who, "pair-50", "B")
        # The fake prefers the good answer, whichever position the judge saw it in: A for alice, B for bob.
        assert seen["alice"]["judge"]["model"] == "judge-7b"
        assert re.fullmatch(r"<b>Response [12]</b> answers the question\.", seen["alice"]["judge"]["rationale"])
        assert [seen[w]["judge"]["verdict"] for w in ("alice", "bob", "carol")] == ["A", "B", "A"]
        assert len(judge.requests) == 1  # asked once, then served from Redis
        req = judge.requests[0]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer judge-key-1"
        assert req["body"]["model"] == "judge-7b" and "good answer 50" in req["body"]["messages"][-1]["content"]
        anns = read_topic(settings, topics.ANNOTATIONS, "Annotation")
        assert sorted(a["annotator"] for a in anns) == ["alice", "bob", "carol"]  # the judge's opinion is no vote
        assert {a["preferred"] for a in anns if a["annotator"] != "bob"} == {"rejected"}
        assert c.queue.redis.hlen(c.queue.k("verdicts", "pair-50")) == 3


@pytest.mark.parametrize("mode", ["error", "garbage", "slow"])
def test_a_failing_judge_leaves_the_task_without_the_aid(settings, mode, caplog):
    fake = FakeJudge(mode)
    try:
        with caplog.at_level(logging.WARNING, "streams.review.judge"), \
                make_client(settings, judge_url=fake.url, judge_timeout_s=0.5, judge_wait_s=30) as c:
            c.queue.add(review_task(60))
            t = next_task(c, "alice")
            assert t["task_id"] == "pair-60" and t["judge"] is None and not t["judge_pending"]
            assert c.get("/api/tasks/pair-60/judge", headers=auth("alice")).json() == {"judge": None,
                                                                                        "judge_pending": False}
            answer(c, "alice", "pair-60")
            assert next_task(c, "bob")["judge"] is None and len(fake.requests) == 1  # not asked again at once
        warnings = [r.getMessage() for r in caplog.records if r.name == "streams.review.judge"]
        assert len(warnings) == 1 and "no aid for task pair-60" in warnings[0]
        assert {"error": "failed", "garbage": "outside", "slow": "timeout"}[mode] in warnings[0]
    finally:
        fake.close()


def test_a_slow_judge_does_not_hold_up_the_annotator_and_reaches_the_page_later(settings):
    fake = FakeJudge("slow")
    try:
        with make_client(settings, judge_url=fake.url, judge_wait_s=0) as c:
            c.queue.add(review_task(70))
            in_order(c, "pair-70", {"alice": "rejected_first"})
            t = next_task(c, "alice")
            assert t["judge"] is None and t["judge_pending"]  # served while the judge is still answering
            assert c.get("/api/tasks/pair-70/judge", headers=auth("bob")).status_code == 403  # not bob's task
            fake.release.set()
            deadline = time.monotonic() + 30
            while (j := c.get("/api/tasks/pair-70/judge", headers=auth("alice")).json())["judge_pending"]:
                assert time.monotonic() < deadline, "the judge's answer never reached Redis"
                time.sleep(0.1)
            assert j["judge"]["verdict"] == "B"  # the good answer is B in alice's order
            answer(c, "alice", "pair-70", "B")
            assert next_task(c, "bob")["judge"]["verdict"] in ("A", "B") and len(fake.requests) == 1
    finally:
        fake.close()
