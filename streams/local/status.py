"""What a running deployment is doing, in one snapshot: for `prefstream up`'s live view and the demo.

Sources: each worker's /metrics (records per topic, routes, DLQ, scored and mispredicted counts,
serving versions), Redis (review queue depth, verdicts, annotator alpha), the model store (serving
versions and their holdout accuracy) and the controller's decision log (retrains in progress).
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from schemas.formats import FormatError, jsonl_objects
from streams.review import audit
from streams.settings import Settings


class Totals(dict[str, float]):
    """Metric sums by label. A label not seen reads 0 without being added, as in a Counter, whose type
    allows only int counts: Prometheus samples are floats."""

    def __missing__(self, key: str) -> float:
        return 0.0


@dataclass
class Snapshot:
    time: float = field(default_factory=time.time)
    workers_up: int = 0
    workers: int = 0
    records_in: Totals = field(default_factory=Totals)
    records_out: Totals = field(default_factory=Totals)
    routes: Totals = field(default_factory=Totals)
    dlq: Totals = field(default_factory=Totals)
    scored: float = 0.0
    mispredicted: float = 0.0
    serving: dict[str, str] = field(default_factory=dict)  # what the workers report they serve
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # the store: role -> version, accuracy
    retrains: dict[str, str] = field(default_factory=dict)  # role -> "running since HH:MM:SS" / last outcome
    review: dict[str, Any] = field(default_factory=dict)
    alpha: float | None = None
    audits: dict[str, Any] = field(default_factory=dict)  # streams/review/audit.py summary
    review_url: str = ""
    # worker (1-based, in start order) -> {partition of prefs.raw it holds: lag, None until it has one}
    assignment: dict[int, dict[int, float | None]] = field(default_factory=dict)


def scrape(url: str, timeout: float = 2.0) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """Samples by name from a Prometheus endpoint, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _add_worker(snap: Snapshot, m: dict[str, list[tuple[dict[str, str], float]]], prefix: str) -> None:
    for labels, v in m.get("prefstream_records_in_total", []):
        snap.records_in[labels["topic"].removeprefix(prefix)] += v
    for labels, v in m.get("prefstream_records_out_total", []):
        snap.records_out[labels["topic"].removeprefix(prefix)] += v
    for labels, v in m.get("prefstream_routes_total", []):
        snap.routes[labels["route"]] += v
    for labels, v in m.get("prefstream_dlq_total", []):
        snap.dlq[labels["reason"]] += v
    snap.scored += sum(v for _, v in m.get("prefstream_scored_total", []))
    snap.mispredicted += sum(v for _, v in m.get("prefstream_mispredicted_total", []))
    for labels, _ in m.get("prefstream_model_info", []):
        snap.serving.update({k: v for k, v in labels.items() if v})


def worker_assignment(m: dict[str, list[tuple[dict[str, str], float]]]) -> dict[int, float | None]:
    """The partitions a worker's /metrics says it holds, each with its lag (None before the first fetch)."""
    lag = {int(labels["partition"]): v for labels, v in m.get("prefstream_partition_lag", [])}
    return {int(labels["partition"]): lag.get(int(labels["partition"]))
            for labels, v in m.get("prefstream_partition_assigned", []) if v}


def assignment_text(held: dict[int, float | None]) -> str:
    """'0,1,2 (lag 5)': the partitions and their summed lag, or 'none'."""
    if not held:
        return "none"
    lags = [v for v in held.values() if v is not None]
    return ",".join(str(p) for p in sorted(held)) + (f" (lag {sum(lags):.0f})" if lags else "")


def controller_decisions(settings: Settings) -> list[dict[str, Any]]:
    """The controller's decision log, oldest first; a line a killed controller left half written is left out."""
    path = settings.controller_decisions_file
    if not path.exists():
        return []
    return [line.obj for line in jsonl_objects(path) if not isinstance(line.obj, FormatError)]


def retrain_state(decisions: list[dict[str, Any]]) -> dict[str, str]:
    """role -> 'running since ...' or the last outcome, from the controller's decisions."""
    state: dict[str, str] = {}
    for d in decisions:
        when = time.strftime("%H:%M:%S", time.localtime(d["time"]))
        if d["decision"] == "triggered":
            state[d["role"]] = f"running since {when} ({d['reason'].split(':')[0]})"
        elif d["decision"] in ("published", "gate_failed", "job_failed", "skipped", "rolled_back"):
            state[d["role"]] = f"{d['decision']} {d.get('version') or ''} at {when}".replace("  ", " ")
    return state


def collect(settings: Settings, worker_metrics: list[str], review_url: str = "", redis_client: Any = None) -> Snapshot:
    snap = Snapshot(workers=len(worker_metrics), review_url=review_url)
    for i, url in enumerate(worker_metrics, start=1):
        m = scrape(url)
        if m is not None:
            snap.workers_up += 1
            _add_worker(snap, m, settings.topic_prefix)
            snap.assignment[i] = worker_assignment(m)
    store = settings.model_store()
    for role in ("current", "gold"):
        v = store.serving(role)
        if v:
            acc = store.get(v).manifest.get("metrics", {}).get("holdout_accuracy")
            snap.models[role] = {"version": v, "holdout_accuracy": acc}
    snap.retrains = retrain_state(controller_decisions(settings))
    if redis_client is not None:
        from streams.review.queue import ReviewQueue

        try:
            snap.review = ReviewQueue(redis_client, settings.topic_prefix).stats()
            raw = redis_client.get(f"{settings.topic_prefix}prefstream:review:alpha:overall")
            snap.alpha = float(raw) if raw else None
            snap.audits = audit.summary(audit.read(redis_client, settings.topic_prefix))
        except Exception:  # a Redis hiccup must not end the status view
            snap.review = {}
    return snap


def rates(now: Snapshot, before: Snapshot | None) -> dict[str, float]:
    """Records per second per topic since the previous snapshot."""
    if before is None or now.time <= before.time:
        return {}
    dt = now.time - before.time
    topics = set(now.records_in) | set(now.records_out)
    return {t: ((now.records_in[t] + now.records_out[t]) - (before.records_in[t] + before.records_out[t])) / dt
            for t in topics}


def render(snap: Snapshot, before: Snapshot | None) -> Group:
    r = rates(snap, before)
    flow = Table(title="topics", expand=False)
    flow.add_column("topic")
    flow.add_column("records", justify="right")
    flow.add_column("per s", justify="right")
    for t in sorted(set(snap.records_in) | set(snap.records_out)):
        flow.add_row(t, f"{snap.records_in[t] + snap.records_out[t]:.0f}", f"{r.get(t, 0.0):.1f}")
    routes = Table(title="routes")
    routes.add_column("route")
    routes.add_column("pairs", justify="right")
    for k, v in sorted(snap.routes.items()):
        routes.add_row(k, f"{v:.0f}")
    models = Table(title="models")
    for col in ("role", "store", "holdout acc.", "workers serve", "retrain"):
        models.add_column(col)
    for role in ("current", "gold"):
        m = snap.models.get(role, {})
        acc = m.get("holdout_accuracy")
        models.add_row(role, m.get("version", "-"), f"{acc:.3f}" if isinstance(acc, float) else "-",
                       snap.serving.get(role, "-"), snap.retrains.get(role, "-"))
    rv = snap.review
    miss = snap.mispredicted / snap.scored if snap.scored else 0.0
    head = (f"workers {snap.workers_up}/{snap.workers} up · scored {snap.scored:.0f} (mispredicted {miss:.1%}) · "
            f"review queue {rv.get('pending', '-')} (+{rv.get('expert', '-')} expert) · verdicts {rv.get('verdicts', '-')}"
            f" · alpha {snap.alpha if snap.alpha is not None else '-'} · DLQ {sum(snap.dlq.values()):.0f}"
            f"\naudited precision: {audit.headline(snap.audits)}"
            f"\npartitions of prefs.raw: {_assignment_line(snap)}")
    grid = Table.grid(padding=(0, 2))
    grid.add_row(flow, routes, models)
    return Group(Panel(head + (f"\nreview app: {snap.review_url}" if snap.review_url else ""), title="prefstream up"),
                 grid)


def one_line(snap: Snapshot, before: Snapshot | None) -> str:
    """The same status as one log line, for terminals that are not interactive."""
    r = rates(snap, before)
    routes = ",".join(f"{k}={v:.0f}" for k, v in sorted(snap.routes.items()))
    models = ",".join(f"{k}={v['version']}" for k, v in snap.models.items())
    return (f"status workers={snap.workers_up}/{snap.workers} scored={snap.scored:.0f} raw_per_s={r.get('prefs.raw', 0):.1f} "
            f"routes[{routes}] review_pending={snap.review.get('pending', '-')} alpha={snap.alpha} "
            f"audits[{audit.headline(snap.audits)}] models[{models}] "
            f"serving[{','.join(f'{k}={v}' for k, v in snap.serving.items())}] "
            f"partitions[{_assignment_line(snap)}]")


class ChangePrinter:
    """`up --plain`: a line when the status changed (rates aside, which move with every poll) or when
    ``every_s`` passed since the last line, so a quiet run does not print the same line each second."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.last_at = every_s, float("-inf")
        self.last_state: str | None = None

    def line(self, snap: Snapshot, before: Snapshot | None) -> str | None:
        state = one_line(snap, None)  # without a previous snapshot the rates read 0: what is left is the state
        if state == self.last_state and snap.time - self.last_at < self.every_s:
            return None
        self.last_state, self.last_at = state, snap.time
        return one_line(snap, before)


def _assignment_line(snap: Snapshot) -> str:
    return " · ".join(f"worker {i}: {assignment_text(held)}" for i, held in sorted(snap.assignment.items())) or "-"
