"""The stats page's charts: what each one computes from its inputs, and SVG that escapes what it names.

The page in a real browser, fed by a real Redis, is tested in tests/test_review_e2e.py.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from xml.etree import ElementTree

from streams import history
from streams.review import dashboard
from streams.review.charts import Series, bar_chart, line_chart

SVG = "{http://www.w3.org/2000/svg}"


def _svg(markup) -> ElementTree.Element:
    return ElementTree.fromstring(str(markup))  # well-formed XML, or this raises


def _points(chart, series: str) -> list[str]:
    """The values the points of ``series`` carry in their titles."""
    group = next(g for g in _svg(chart).iter(SVG + "g") if g.get("data-series") == series)
    return [c.find(SVG + "title").text.rsplit(": ", 1)[1] for c in group.iter(SVG + "circle")]


def _buckets(*counts: dict[str, float]) -> list[history.Bucket]:
    return [history.Bucket(60 * i, dict(c)) for i, c in enumerate(counts)]


def test_a_line_chart_escapes_names_and_breaks_its_line_at_a_gap():
    hostile = '<script>alert(1)</script>"'
    chart = line_chart("c", "t & t", ["a", "b", "c", "d"], [Series(hostile, [1.0, None, 2.0, 3.0])])
    assert "<script>" not in str(chart)
    root = _svg(chart)
    group = next(root.iter(SVG + "g"))
    assert group.get("data-series") == hostile  # the name survives, escaped, as the reader sees it
    # One point alone before the gap has no line; the two after it make one.
    assert [len(p.get("points").split()) for p in group.iter(SVG + "polyline")] == [2]
    assert len(list(group.iter(SVG + "circle"))) == 3


def test_points_above_the_fixed_scale_or_below_zero_stay_inside_and_keep_their_value_in_the_title():
    chart = line_chart("c", "t", ["a", "b"], [Series("s", [1.7, -0.2])], y_max=1.0)
    ys = [float(c.get("cy")) for c in _svg(chart).iter(SVG + "circle")]
    top, bottom = 12, 220 - 28
    assert ys == [top, bottom]
    assert _points(chart, "s") == ["1.7", "-0.2"]


def test_a_bar_chart_draws_one_bar_per_value_and_none_for_a_missing_one():
    chart = bar_chart("b", "t", ["x", "<y>"], [Series("alpha", [0.5, None]), Series("precision", [1.0, 0.25])], y_max=1.0)
    bars = {g.get("data-series"): [r.find(SVG + "title").text for r in g.iter(SVG + "rect")]
            for g in _svg(chart).iter(SVG + "g")}
    assert bars == {"alpha": ["alpha, x: 0.5"], "precision": ["precision, x: 1", "precision, <y>: 0.25"]}


def test_the_human_share_leaves_deferred_pairs_out_and_has_no_value_in_an_empty_minute():
    charts = dashboard.routes(_buckets({"review": 1, "silver": 2, "deferred": 5}, {}, {"review": 3}))
    assert [c.id for c in charts] == ["routes-chart", "human-share-chart"]
    assert _points(charts[1].svg, "human share") == ["0.333", "1"]  # the empty minute has no point
    assert _points(charts[0].svg, "deferred") == ["5", "0", "0"]


def test_no_routes_yet_says_so_instead_of_drawing():
    charts = dashboard.routes(_buckets({}, {}))
    assert all(c.svg is None and "no pair routed in the last 2 minutes" in c.empty for c in charts)


def test_open_tasks_are_rebuilt_backwards_from_now_and_ages_are_means_per_minute():
    buckets = _buckets({"added": 4}, {"added": 1, "closed": 2, "aged": 2, "age_s": 300}, {"closed": 1, "aged": 1,
                                                                                          "age_s": 60})
    open_chart, age_chart = dashboard.queue(buckets, open_now=2)
    # End of minute 2: 2 open; minute 2 closed 1, so 3 at the end of minute 1; minute 1 added 1 and
    # closed 2, so 4 at the end of minute 0.
    assert _points(open_chart.svg, "open tasks") == ["4", "3", "2"]
    assert _points(age_chart.svg, "mean age") == ["2.5 min", "1 min"]


def test_versions_chart_shows_the_current_role_in_order_and_says_why_when_the_store_is_unreadable():
    infos = [SimpleNamespace(version=v, manifest=m) for v, m in [
        ("v1", {"role": "current", "metrics": {"holdout_accuracy": 0.8}, "calibration": {"ece": 0.05}}),
        ("g1", {"role": "gold", "metrics": {"holdout_accuracy": 0.99}}),
        ("v2", {"role": "current", "metrics": {"holdout_accuracy": 0.85}, "calibration": {"ece": float("nan")}})]]
    chart = dashboard.versions(infos).svg
    assert _points(chart, "holdout accuracy") == ["0.8", "0.85"]
    assert _points(chart, "ECE") == ["0.05"]  # NaN: no pairs were measured
    assert re.findall(r">(v\d|g\d)<", str(chart)) == ["v1", "v2"]
    unreadable = dashboard.versions(None, "access denied")
    assert unreadable.svg is None and unreadable.empty.endswith("access denied")


def test_audit_precision_per_category_counts_silver_and_flipped_together():
    audits = {"silver": {"all": {"right": 3, "wrong": 1}, "math": {"right": 3, "wrong": 1}},
              "flipped": {"all": {"right": 0, "wrong": 4}, "math": {"right": 0, "wrong": 2}, "code": {"right": 0,
                                                                                                 "wrong": 2}}}
    chart = dashboard.categories({"math": 0.9, "chat": -0.1}, audits).svg
    bars = {g.get("data-series"): [r.find(SVG + "title").text for r in g.iter(SVG + "rect")]
            for g in _svg(chart).iter(SVG + "g")}
    assert bars["audit precision"] == ["audit precision, code: 0", "audit precision, math: 0.5"]
    assert bars["alpha"] == ["alpha, chat: -0.1", "alpha, math: 0.9"]
