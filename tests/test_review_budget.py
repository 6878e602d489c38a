"""The review budget defers and re-scores: the budget's arithmetic, its parser, the due rule of the
second look, and the pipeline's routes under a budget (no broker; the worker's run is in test_deferred.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from streams.exceptions import ConfigError
from streams.review_budget import parse_budget
from streams.runtime.curation.budget import ReviewBudget, apply_budget, defer_beyond
from streams.runtime.deferred import NEWER, WAITED, due, is_newer
from streams.runtime.processors.router import Route
from streams.settings import WorkerSettings
from tests.helpers import FakeMessage, FakeScorer, decoded_outputs, fake_pipeline

V1, V2 = "current-20260101-120000-aaaaaa", "current-20260102-090000-bbbbbb"

# ---------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(("text", "per_hour", "share"), [
    ("120/h", 120, None), (" 30 / h ", 30, None), ("0/h", 0, None),
    ("30%", None, 0.3), ("2.5 %", None, 0.025), ("0%", None, 0.0), ("100%", None, 1.0),
])
def test_the_budget_forms_parse(text, per_hour, share):
    spec = parse_budget(text)
    assert (spec.per_hour, spec.share) == (per_hour, pytest.approx(share) if share is not None else None)


@pytest.mark.parametrize("text", ["lots", "120", "-5%", "150%", "10/m", "1/h/h", "%", "/h", "30%%"])
def test_other_budgets_are_refused_naming_the_forms(text):
    with pytest.raises(ConfigError, match=r"'N/h'.*'X%'"):
        parse_budget(text)
    with pytest.raises(ValidationError, match="PREFSTREAM_WORKER_REVIEW_BUDGET"):
        WorkerSettings(review_budget=text)


def test_no_budget_is_the_default_and_sends_every_candidate_to_review():
    assert WorkerSettings().review_budget is None and parse_budget(None) is None and parse_budget("  ") is None
    assert ReviewBudget(None).allow(50, 50) == 50


# ---------------------------------------------------------------------------------------------- arithmetic


def test_an_hourly_budget_spends_per_clock_hour():
    now = [7200.0]
    budget = ReviewBudget(parse_budget("3/h"), clock=lambda: now[0])
    assert budget.allow(2, 10) == 2
    assert budget.allow(5, 10) == 1
    budget.spend(4)  # the second look's reviews count too
    assert budget.allow(5, 10) == 0
    now[0] += 3599
    assert budget.allow(5, 10) == 0, "still the same clock hour"
    now[0] += 1
    assert budget.allow(5, 10) == 3


def test_a_share_budget_is_a_running_ratio_of_the_pairs_routed():
    budget = ReviewBudget(parse_budget("30%"))
    assert budget.allow(5, 10) == 3
    assert budget.allow(0, 10) == 0
    assert budget.allow(10, 10) == 6, "the room left by the batch without candidates is kept"
    assert budget.allow(1, 0) == 0


def test_the_budget_keeps_the_lowest_p_and_defers_the_rest_highest_p_first():
    ps = [0.62, 0.31, 0.75, 0.05, 0.55]
    assert defer_beyond(ps, 2) == {0, 2, 4}
    assert defer_beyond(ps, 0) == set(range(5)) and defer_beyond(ps, 9) == set()
    error = ValueError("not routable")
    decisions = [Route("review", "uncertain", 3), Route("review", "mispredicted", 8), Route("silver", "confident"),
                 error, Route("review", "mispredicted", 8), Route("review", "uncertain", 3)]
    ps = [0.7, 0.4, 0.95, 0.5, 0.2, 0.6]
    out = apply_budget(decisions, ps, ReviewBudget(parse_budget("2/h")), ["bootstrap"] * 6)
    assert [d.kind if isinstance(d, Route) else d for d in out] == [
        "deferred", "review", "silver", error, "review", "deferred"]
    assert out[0].reason == "review budget 2/h spent: uncertain, p=0.700 by bootstrap"


# ---------------------------------------------------------------------------------------------- due rule


def test_a_deferred_pair_is_due_when_a_newer_version_serves_or_it_waited_too_long():
    assert is_newer(V1, "bootstrap") and is_newer(V2, V1)
    assert not is_newer(V1, V2), "a rollback to an older version is not a newer model"
    assert not is_newer(V1, V1) and not is_newer("bootstrap", V1)
    assert due(V1, V2, deferred_at_ms=0, now_ms=1000, max_wait_ms=60_000) == NEWER
    assert due(V1, V1, deferred_at_ms=0, now_ms=60_001, max_wait_ms=60_000) == WAITED
    assert due(V1, V1, deferred_at_ms=0, now_ms=60_000, max_wait_ms=60_000) is None
    assert due(V2, V1, deferred_at_ms=0, now_ms=1000, max_wait_ms=60_000) is None


# ---------------------------------------------------------------------------------------------- pipeline


class PScorer(FakeScorer):
    """p is the number after the last '-' of the pair id (pair 'x-0.30' gets p = 0.30); version ``version``."""

    def __init__(self, version: str = "bootstrap") -> None:
        super().__init__()
        self.version = version

    def score(self, pairs):
        out = super().score(pairs)
        for pair, s in zip(pairs, out, strict=True):
            s.update(p=float(pair["pair_id"].rsplit("-", 1)[1]), model_version=self.version)
        return out


def _msgs(ps: list[float]) -> list[FakeMessage]:
    return [FakeMessage(json.dumps({"pair_id": f"pair{i}-{p:.2f}", "prompt": f"Tell me about {i} things.",
                                    "chosen": f"Here are {i} things.", "rejected": "No."}).encode(), offset=i)
            for i, p in enumerate(ps)]


def test_a_budget_defers_the_surest_candidates_to_prefs_deferred():
    ps = [0.30, 0.72, 0.55, 0.10, 0.91, 0.65]  # 0.91 is confident (dropped: no gold model); five candidates
    out = decoded_outputs(fake_pipeline(PScorer(), review_budget="3/h").process(_msgs(ps)))
    routes = {r["pair"]["pair_id"]: r["route"] for r in out["prefs.scored"]}
    assert routes == {"pair0-0.30": "review", "pair1-0.72": "deferred", "pair2-0.55": "review",
                      "pair3-0.10": "review", "pair4-0.91": "dropped", "pair5-0.65": "deferred"}
    assert sorted(t["pair"]["pair_id"] for t in out["prefs.review"]) == ["pair0-0.30", "pair2-0.55", "pair3-0.10"]
    deferred = {r["pair"]["pair_id"]: r for r in out["prefs.deferred"]}
    assert set(deferred) == {"pair1-0.72", "pair5-0.65"}
    assert all(r["route"] == "deferred" and "review budget 3/h spent: uncertain" in r["route_reason"]
               for r in deferred.values())
    assert deferred["pair1-0.72"]["pair"]["task_category"], "the deferred pair keeps its labels"


def test_without_a_budget_nothing_is_deferred():
    out = decoded_outputs(fake_pipeline(PScorer()).process(_msgs([0.30, 0.72, 0.55])))
    assert len(out["prefs.review"]) == 3 and "prefs.deferred" not in out


def test_the_second_look_routes_past_the_budget_with_its_reason():
    first = fake_pipeline(PScorer(), review_budget="0%")
    deferred = decoded_outputs(first.process(_msgs([0.30, 0.72])))["prefs.deferred"]
    assert len(deferred) == 2
    again = fake_pipeline(PScorer(V1), review_budget="0%")
    msgs = _msgs([0.30, 0.72])
    out = decoded_outputs(again.process_deferred(msgs, [r["pair"] for r in deferred],
                                                 lambda it, d: f"still uncertain after rescoring with {V1}"))
    assert "prefs.deferred" not in out, "a second look never defers again, whatever the budget"
    assert {r["route"] for r in out["prefs.scored"]} == {"review"}
    assert {r["model_version"] for r in out["prefs.scored"]} == {V1}
    assert {t["reason"] for t in out["prefs.review"]} == {f"still uncertain after rescoring with {V1}"}


def test_the_worker_command_refuses_a_bad_budget_in_one_line():
    from click.testing import CliRunner

    from streams.cli import main

    result = CliRunner().invoke(main, ["worker"], env={"PREFSTREAM_WORKER_REVIEW_BUDGET": "fast"})
    assert result.exit_code == 1
    assert "PREFSTREAM_WORKER_REVIEW_BUDGET='fast' is not a budget" in " ".join(result.output.split())
    assert "Traceback" not in result.output
