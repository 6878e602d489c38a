"""Audited automation: a share of silver and flipped pairs goes to review blind, the human majority is
counted against the automatic label per category, and the controller moves tau per category by it."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import redis

from streams.local.report import audits
from streams.review import audit, task_ids, tau
from streams.review.app import task_view
from streams.review.task_ids import TaskIds
from streams.runtime.processors.router import RouterPolicy, route
from tests.helpers import (
    REVIEW_TOKENS,
    ROOT,
    FakeMessage,
    FakeScorer,
    annotation,
    auth,
    decoded_outputs,
    fake_pipeline,
    make_client,
    review_task,
)

# ---------------------------------------------------------------------------------------------- selection


def test_the_audited_share_follows_the_setting_and_is_stable_per_pair():
    ids = [f"pair-{i}" for i in range(4000)]
    share = sum(audit.is_audited(i, 0.05) for i in ids) / len(ids)
    assert 0.04 < share < 0.06
    # Stable: another process (another hash seed) audits the same pairs, as a batch redone after a crash must.
    here = [i for i in ids if audit.is_audited(i, 0.05)]
    code = ("import json, sys; from streams.review import audit; "
            "print(json.dumps([i for i in json.load(sys.stdin) if audit.is_audited(i, 0.05)]))")
    other = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                           env=os.environ | {"PYTHONHASHSEED": "12345"}, cwd=ROOT, check=True)
    assert json.loads(other.stdout) == here
    # Nested: a larger share audits a superset, so raising it keeps every audit already planned.
    assert set(here) <= {i for i in ids if audit.is_audited(i, 0.2)}
    assert not any(audit.is_audited(i, 0.0) for i in ids) and all(audit.is_audited(i, 1.0) for i in ids)


class ConfidentScorer(FakeScorer):
    """Both models confident for the label on 'silver-*' pairs and against it on 'flip-*' pairs; unsure
    (p 0.65: review) on 'unsure-*' pairs."""

    def score(self, pairs):
        out = super().score(pairs)
        for pair, s in zip(pairs, out, strict=True):
            pid = pair["pair_id"]
            p = 0.97 if pid.startswith("silver") else 0.65 if pid.startswith("unsure") else 0.02
            s.update(p=p, gold_p=p, gold_reward_chosen=0.0, gold_reward_rejected=math.log(1 / p - 1),
                     gold_model_version="gold-v1")
        return out


def _pairs(prefix: str, n: int) -> list[FakeMessage]:
    # The prefix is in the prompt too: pairs of equal content would be dropped as duplicates at ingest.
    return [FakeMessage(json.dumps({"pair_id": f"{prefix}-{i}", "prompt": f"{prefix}: what is {i} plus {i}?",
                                    "chosen": f"It is {2 * i}.", "rejected": "No idea."}).encode(), offset=i)
            for i in range(n)]


@pytest.mark.parametrize("share", [1.0, 0.0])
def test_audited_silver_and_flipped_pairs_also_go_to_review_blind(share):
    out = decoded_outputs(fake_pipeline(ConfidentScorer(), audit_share=share).process(_pairs("silver", 3)
                                                                                         + _pairs("flip", 2)))
    assert sorted(c["split"] for c in out["prefs.curated"]) == ["flipped"] * 2 + ["silver"] * 3, \
        "an audit never holds back the curated record"
    tasks = out.get("prefs.review", [])
    if share == 0.0:
        assert tasks == []
        return
    assert sorted((t["pair"]["pair_id"], t["reason"]) for t in tasks) == sorted(
        [(f"silver-{i}", "audit:silver") for i in range(3)] + [(f"flip-{i}", "audit:flipped") for i in range(2)])
    assert all(t["priority"] == pytest.approx(audit.PRIORITY, abs=1e-3) for t in tasks)
    # The annotator sees neither p nor margin: they would tell what the automatic label chose.
    view = task_view(tasks[0], "ann", "chosen_first", 60)
    assert view["p"] is None and view["margin"] is None
    assert task_view(tasks[0] | {"reason": "uncertain"}, "ann", "chosen_first", 60)["margin"] is not None


TASK_ID_FORM = re.compile(r"[0-9a-f]{32}")


@pytest.mark.integration
def test_audit_task_ids_look_like_any_task_id(settings):
    """Review, audit, expert and re-annotation tasks made by the worker's pipeline and the aggregator on
    the real Redis, served through the app: every id has one form (32 hex digits), none carries its pair
    id or its kind, and the same pair's review and audit ids are unrelated."""
    from streams.review.aggregator import Aggregator, needs_reannotation
    from streams.runtime.pipeline import Pipeline
    from streams.settings import WorkerSettings
    from tests.helpers import FakeEmbedder

    r = redis.Redis.from_url(settings.redis_url)
    pipeline = Pipeline(settings, WorkerSettings(audit_share=1.0), r, ConfidentScorer(), FakeEmbedder())
    outputs = pipeline.process(_pairs("silver", 6) + _pairs("flip", 6) + _pairs("unsure", 6))
    out = decoded_outputs([(topic.removeprefix(settings.topic_prefix), *rest) for topic, *rest in outputs])
    tasks = out["prefs.review"]
    reasons = [t["reason"] for t in tasks]
    assert {"audit:silver", "audit:flipped"} <= set(reasons) and sum(not x.startswith("audit:") for x in reasons) == 6
    # The aggregator's expert and re-annotation tasks, from another process's view of the same key.
    aggregator = Aggregator(redis.Redis.from_url(settings.redis_url), settings.topic_prefix)
    unsure = next(t for t in tasks if not t["reason"].startswith("audit:"))
    for who, v in zip("xyz", ("chosen", "rejected", "tie"), strict=True):
        escalated = aggregator.handle(annotation(unsure, who, v), unsure)
    (_, _, expert_task), = escalated
    repid = next(f"re-{i}" for i in range(1000) if needs_reannotation(f"re-{i}"))
    re_task = review_task(0) | {"pair": review_task(0)["pair"] | {"pair_id": repid}, "task_id": aggregator.task_ids.of(repid)}
    for who in "xyz":
        made = aggregator.handle(annotation(re_task, who, "chosen"), re_task)
    reannotation = next(rec for name, _, rec in made if name == "prefs.review")
    ids = [t["task_id"] for t in [*tasks, expert_task, reannotation]]
    assert len(set(ids)) == len(ids)
    for t in [*tasks, expert_task, reannotation]:
        assert TASK_ID_FORM.fullmatch(t["task_id"]), t["task_id"]
        assert t["pair"]["pair_id"] not in t["task_id"] and ":" not in t["task_id"]
    # Served through the app, an audit and a routed task differ in nothing an id could tell.
    with make_client(settings) as c:
        for t in tasks:
            c.queue.add(t)
        served = []
        while (got := c.get("/api/tasks/next", headers=auth("alice"))).status_code == 200:
            served.append(got.json()["task_id"])
            c.post(f"/api/tasks/{served[-1]}/verdict", json={"verdict": "A"}, headers=auth("alice"))
    assert sorted(served) == sorted(t["task_id"] for t in tasks)
    assert all(TASK_ID_FORM.fullmatch(tid) for tid in served)


# ---------------------------------------------------------------------------------------------- tau per category


def test_tau_per_category_moves_the_uncertain_bound_within_limits():
    policy = RouterPolicy(0.8, 0.6, 0.1, {"math": 0.15, "chat": -0.15, "wild": 0.5})
    assert route(0.9, 0.9, None, policy, "math").kind == "review"
    assert route(0.9, 0.9, None, policy, "coding").kind == "silver", "a category without a shift keeps tau"
    assert route(0.7, 0.9, None, policy, "chat").kind == "silver"
    assert policy.tau_for("wild") == pytest.approx(0.99) and policy.tau_for(None) == 0.8


def test_the_worker_reads_the_controllers_shifts():
    pipeline = fake_pipeline(ConfidentScorer())
    pipeline.redis.hashes[tau.shift_key("")] = {b"math": b"0.05", b"odd": b"not-a-number"}
    pipeline.process(_pairs("silver", 1))
    assert pipeline.policy.tau_for("math") == pytest.approx(0.85) and pipeline.policy.tau_for("odd") == 0.8


def _count(r, prefix: str, category: str, kind: str, outcomes: dict[str, int]) -> None:
    pipe = r.pipeline()
    for outcome, n in outcomes.items():
        for _ in range(n):
            audit.record(pipe, prefix, category, kind,
                         None if outcome == "split" else (audit.EXPECTED[kind] if outcome == "right" else "other"))
    pipe.execute()


def test_the_tuner_moves_tau_on_fresh_audits_only_and_within_bounds(agg, caplog):  # noqa: F811
    _, r, prefix = agg
    tuner = tau.TauTuner(r, prefix, tau.TauRule(target=0.97, comfortable=0.99, min_audits=20, step=0.05, max_shift=0.1))
    _count(r, prefix, "math", "silver", {"right": 10, "wrong": 2})
    _count(r, prefix, "math", "flipped", {"wrong": 30})  # flipped precision is reported, never moves tau
    assert tuner.step() == [], "12 audits are too few to move"
    _count(r, prefix, "math", "silver", {"right": 8, "wrong": 1, "split": 5})
    with caplog.at_level(logging.INFO, logger="streams.review.tau"):
        [move] = tuner.step()
    assert (move["category"], move["shift_from"], move["shift_to"]) == ("math", 0.0, 0.05)
    assert "precision 0.857 over 21 audits < target 0.97" in move["reason"] and "math" in caplog.text
    assert tuner.step() == [], "the same audits never move tau twice"
    for _ in range(2):
        _count(r, prefix, "math", "silver", {"wrong": 20})
        tuner.step()
    assert tau.read_shifts(r, prefix)["math"] == pytest.approx(0.1), "never past max_shift"
    _count(r, prefix, "chat", "silver", {"right": 20})
    [down] = tuner.step()
    assert (down["category"], down["shift_to"]) == ("chat", -0.05) and ">= 0.99" in down["reason"]


# ---------------------------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(("kind", "votes", "outcome"), [
    ("silver", ["chosen", "rejected", "chosen"], "right"),
    ("silver", ["rejected", "rejected", "chosen"], "wrong"),
    ("flipped", ["rejected", "rejected", "rejected"], "right"),
    ("flipped", ["chosen", "rejected", "tie"], "split"),
])
def test_an_audit_is_decided_by_the_majority_and_counted_once_committed(agg, kind, votes, outcome):  # noqa: F811
    a, r, prefix = agg
    t = review_task(7, task_category="math") | {"task_id": TaskIds(r, prefix).of("pair-7", task_ids.AUDIT),
                                         "reason": f"audit:{kind}"}
    outputs = [a.handle(annotation(t, who, v), t) for who, v in zip("xyz", votes, strict=True)]
    assert outputs == [[], [], []], "an audit writes no record and is never escalated"
    assert audit.read(r, prefix) == {}, "nothing counts before the batch commits"
    a.committed()
    assert a.handle(annotation(t, "z", votes[-1]), t) == []
    a.committed()
    count = audit.read(r, prefix)[("math", kind)]
    assert getattr(count, outcome) == 1 and count.right + count.wrong + count.split == 1


# ---------------------------------------------------------------------------------------------- shown


def test_stats_and_metrics_show_audited_precision(settings):
    c = make_client(settings)
    r = redis.Redis.from_url(settings.redis_url)
    _count(r, settings.topic_prefix, "math", "silver", {"right": 9, "wrong": 1})
    r.hset(tau.shift_key(settings.topic_prefix), "math", "0.05")
    token = REVIEW_TOKENS.split(",")[0].split(":")[1]
    stats = c.get("/api/stats", headers={"Authorization": f"Bearer {token}"}).json()
    assert stats["audits"]["silver"]["math"]["precision"] == pytest.approx(0.9)
    assert stats["tau_shift"] == {"math": 0.05}
    page = c.get("/stats", headers={"Authorization": f"Bearer {token}"}).text
    assert "<td>math</td><td>9</td><td>1</td>" in page and "+0.05" in page
    metrics = c.get("/metrics").text
    assert 'prefstream_audit_precision{category="math",kind="silver"} 0.9' in metrics


def test_the_report_decides_audits_from_the_topics():
    pair = {"pair_id": "p1", "task_category": "math"}
    curated = {"p1": {"split": "silver", "pair": pair}, "p2": {"split": "flipped", "pair": pair | {"pair_id": "p2"}}}
    annotations = [({"task_id": f"audit-of-{pid}", "pair_id": pid, "annotator": who, "preferred": v}, 0)
                   for pid, votes in (("p1", "ccr"), ("p2", "ccr")) for who, v in zip("xyz", votes, strict=True)]
    annotations = [(a | {"preferred": {"c": "chosen", "r": "rejected"}[a["preferred"]]}, ts) for a, ts in annotations]
    annotations.append(({"task_id": "p3", "pair_id": "p3", "annotator": "x", "preferred": "chosen"}, 0))
    got = audits(annotations, curated, {"audit-of-p1", "audit-of-p2"})
    assert got["tasks_answered"] == 2
    assert got["by_kind"]["silver"]["math"]["right"] == 1 and got["by_kind"]["flipped"]["math"]["wrong"] == 1
