"""What the stats page charts, built from the per-minute history (streams/history.py), the queue, the
aggregator's counts and the model store: routes and the human share over time, the queue and the age
of tasks, accuracy and calibration per model version, alpha and audit precision per category."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from streams import history
from streams.review.charts import Series, bar_chart, line_chart

log = logging.getLogger(__name__)

DEFAULT_MINUTES = 120
MAX_MINUTES = history.RETENTION_S // history.BUCKET_S
DEFERRED = "deferred"  # a route that is not a decision yet: left out of the human share's denominator


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    note: str  # what is drawn and how it was counted
    svg: Markup | None = None
    empty: str = ""  # why there is nothing to draw yet, when svg is None


def _minute_labels(buckets: Sequence[history.Bucket]) -> list[str]:
    return [time.strftime("%H:%M", time.gmtime(b.start)) for b in buckets]


def routes(buckets: Sequence[history.Bucket]) -> list[Chart]:
    """Pairs routed per minute by route, and the share of the decided ones that went to people."""
    kinds = sorted({k for b in buckets for k in b.counts})
    note = ("Pairs routed per minute by the workers, counted when their batch committed (UTC minutes). Human "
            "share: review over every route but deferred, which is not decided yet.")
    if not kinds:
        empty = f"no pair routed in the last {len(buckets)} minutes"
        return [Chart("routes-chart", "Routes per minute", note, empty=empty),
                Chart("human-share-chart", "Human share per minute", note, empty=empty)]
    labels = _minute_labels(buckets)
    per_kind = [Series(k, [b.counts.get(k, 0.0) for b in buckets]) for k in kinds]
    share = []
    for b in buckets:
        decided = sum(v for k, v in b.counts.items() if k != DEFERRED)
        share.append(b.counts.get("review", 0.0) / decided if decided else None)
    return [Chart("routes-chart", "Routes per minute", note, line_chart("routes-chart", "Routes per minute", labels, per_kind)),
            Chart("human-share-chart", "Human share per minute", note,
                  line_chart("human-share-chart", "Human share per minute", labels, [Series("human share", share)],
                             y_max=1.0))]


def queue(buckets: Sequence[history.Bucket], open_now: int) -> list[Chart]:
    """Open review tasks per minute (from now's count, undoing each minute's adds and closes backwards)
    and the mean age of the tasks closed in each minute."""
    labels = _minute_labels(buckets)
    open_at: list[float | None] = [None] * len(buckets)
    level = float(open_now)
    for i in range(len(buckets) - 1, -1, -1):
        open_at[i] = level
        level = max(0.0, level - buckets[i].counts.get("added", 0.0) + buckets[i].counts.get("closed", 0.0))
    ages = [b.counts["age_s"] / b.counts["aged"] / 60 if b.counts.get("aged") else None for b in buckets]
    note = ("Open tasks at the end of each minute: now's queue length, with each minute's added and closed tasks "
            "undone backwards. Age: from routing to the last verdict, averaged over the tasks closed in the minute.")
    charts = [Chart("queue-chart", "Open review tasks", note,
                    line_chart("queue-chart", "Open review tasks", labels, [Series("open tasks", open_at)]))]
    if any(a is not None for a in ages):
        charts.append(Chart("age-chart", "Age of tasks when closed", note,
                            line_chart("age-chart", "Age of tasks when closed", labels,
                                       [Series("mean age", ages)], y_unit=" min")))
    else:
        charts.append(Chart("age-chart", "Age of tasks when closed", note,
                            empty=f"no task closed in the last {len(buckets)} minutes"))
    return charts


def versions(infos: Sequence[Any] | None, error: str = "") -> Chart:
    """Holdout accuracy and expected calibration error (at the version's temperature) of each published
    version of the current role, oldest first, as the gate measured them when it published."""
    note = ("Measured by the retrain gate on the clean holdout when the version was published; ECE at the "
            "version's calibration temperature.")
    if infos is None:
        return Chart("versions-chart", "Model versions", note, empty=f"the model store cannot be read here: {error}")
    current = [v for v in infos if v.manifest.get("role") == "current"]
    if not current:
        return Chart("versions-chart", "Model versions", note, empty="no version published yet")
    accuracy = [_number(v.manifest.get("metrics", {}).get("holdout_accuracy")) for v in current]
    ece = [_number((v.manifest.get("calibration") or {}).get("ece")) for v in current]
    return Chart("versions-chart", "Model versions", note,
                 line_chart("versions-chart", "Accuracy and calibration per model version", [v.version for v in current],
                            [Series("holdout accuracy", accuracy), Series("ECE", ece)], y_max=1.0))


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and v == v else None  # NaN: no pairs measured


def categories(alpha_by_category: dict[str, float], audits: dict[str, dict[str, dict[str, Any]]]) -> Chart:
    """Krippendorff's alpha and the audits' precision (silver and flipped together) per task category."""
    right: dict[str, int] = {}
    wrong: dict[str, int] = {}
    for per in audits.values():
        for cat, c in per.items():
            if cat != "all":
                right[cat] = right.get(cat, 0) + c["right"]
                wrong[cat] = wrong.get(cat, 0) + c["wrong"]
    cats = sorted(set(alpha_by_category) | set(right))
    note = ("Alpha over the rolling window's tasks of each category; audit precision: the share of blind audits of "
            "silver and flipped pairs the human majority confirmed.")
    if not cats:
        return Chart("categories-chart", "By task category", note, empty="no task decided yet")
    precision = [right[c] / (right[c] + wrong[c]) if right.get(c, 0) + wrong.get(c, 0) else None for c in cats]
    return Chart("categories-chart", "By task category", note,
                 bar_chart("categories-chart", "Alpha and audit precision per task category", cats,
                           [Series("alpha", [alpha_by_category.get(c) for c in cats]),
                            Series("audit precision", precision)], y_max=1.0))


def charts(client: Any, prefix: str, stats: dict[str, Any], list_versions: Callable[[], Sequence[Any]] | None,
           minutes: int = DEFAULT_MINUTES) -> list[Chart]:
    """Every chart of the stats page, for the last ``minutes`` minutes where it is drawn over time."""
    now = time.time()
    routed = history.read(client, prefix, history.ROUTES, minutes, now)
    queued = history.read(client, prefix, history.QUEUE, minutes, now)
    infos, error = None, "no model store is configured for the review app"
    if list_versions is not None:
        try:
            infos = list_versions()
        except Exception as exc:  # a store this app cannot reach costs the chart, never the page
            log.warning("the stats page cannot read the model store: %s", exc)
            error = str(exc)
    return [*routes(routed), *queue(queued, stats["pending"] + stats["expert"]), versions(infos, error),
            categories(stats["alpha_by_category"], stats["audits"])]
