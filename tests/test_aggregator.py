"""Aggregation: verdict patterns give the right gold label, escalation and alpha; the loop end to end."""

from __future__ import annotations

import threading
import time

import krippendorff
import numpy as np
import pytest
import redis

from streams.kafka import topics
from streams.review.aggregator import Aggregator, alpha, decide, needs_reannotation
from tests.helpers import read_topic
from tests.test_review import task


@pytest.mark.parametrize(("votes", "kind", "preferred", "by"), [
    (["chosen", "chosen", "chosen"], "verified", "chosen", "unanimous"),
    (["rejected", "chosen", "rejected"], "verified", "rejected", "majority"),
    (["chosen", "rejected", "tie"], "escalate", None, "split"),
    (["tie", "tie", "chosen"], "escalate", None, "split"),
    (["invalid", "invalid", "invalid"], "escalate", None, "split"),
    (["both_bad", "chosen", "both_bad"], "escalate", None, "split"),
])
def test_verdict_patterns(votes, kind, preferred, by):
    d = decide(votes)
    assert (d.kind, d.preferred, d.decided_by) == (kind, preferred, by)


def test_expert_verdict_is_final():
    assert decide(["rejected"], expert=True).preferred == "rejected"
    assert decide(["tie"], expert=True).kind == "discarded"


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


@pytest.fixture
def agg(stack, stack_settings):
    r = redis.Redis.from_url(stack_settings.redis_url)
    prefix = f"agg{time.monotonic_ns()}."
    a = Aggregator(r, prefix)
    return a, r, prefix


def ann(t: dict, who: str, preferred: str, **extra) -> dict:
    return {"task_id": t["task_id"], "annotator": who, "preferred": preferred} | extra


def test_majority_gives_verified_and_gold_oriented_by_the_humans(agg):
    a, r, prefix = agg
    t = task(1)
    assert a.handle(ann(t, "x", "rejected"), t) == []
    assert a.handle(ann(t, "y", "chosen"), t) == []
    out = a.handle(ann(t, "z", "rejected"), t)
    kinds = {name: rec for name, _, rec in out}
    v, c = kinds["prefs.verified"], kinds["prefs.curated"]
    assert v["label"] == "flipped" and v["decided_by"] == "majority" and v["agreement"] == pytest.approx(2 / 3)
    assert v["pair"]["chosen"] == "bad answer 1" and c["split"] == "gold" and c["pair"]["label_source"] == "human"
    assert a.handle(ann(t, "z", "rejected"), t) == [], "a replayed annotation must not decide twice"


def test_split_escalates_and_the_expert_decides(agg):
    a, r, prefix = agg
    t = task(2)
    a.handle(ann(t, "x", "chosen"), t)
    a.handle(ann(t, "y", "rejected"), t)
    (name, schema, expert_task), = a.handle(ann(t, "z", "tie"), t)
    assert name == "prefs.review" and expert_task["expert"] and expert_task["task_id"] == "pair-2:expert"
    out = a.handle(ann(expert_task, "erin", "chosen", expert=True), expert_task)
    assert [n for n, _, _ in out] == ["prefs.verified", "prefs.curated"]
    assert out[0][2]["decided_by"] == "expert" and out[0][2]["label"] == "kept"


@pytest.mark.integration
def test_three_verdicts_through_the_app_reach_verified_and_curated(settings):
    from fastapi.testclient import TestClient

    from streams.review import aggregator
    from streams.review.app import create_app
    from streams.settings import ReviewSettings
    from tests.test_review import TOKENS, auth

    app = create_app(settings, ReviewSettings(tokens=TOKENS, lease_s=30))
    stop = threading.Event()
    th = threading.Thread(target=aggregator.run, args=(settings, app.state.queue.r, stop), daemon=True)
    th.start()
    try:
        with TestClient(app) as c:
            app.state.queue.add(task(9))
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
