"""The Grafana dashboard and the alert rules query only metrics that prefstream exports."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import REGISTRY

from tests.helpers import ROOT

MONITORING = ROOT / "k8s" / "monitoring"
# Metrics that come from outside prefstream, with who exports them.
EXTERNAL = {"kafka_consumergroup_lag": "a Kafka exporter (Strimzi's Kafka Exporter, kafka-exporter)"}
METRIC = re.compile(r"\b((?:prefstream|kafka)_[a-z0-9_]+)")


def exported_samples() -> set[str]:
    """Every sample name the processes' registries can expose (counters' _total, histograms' _bucket, ...)."""
    import streams.kafka.deadletter  # noqa: F401
    import streams.review.metrics  # noqa: F401
    import streams.runtime.controller  # noqa: F401  (registers the controller's metrics)
    import streams.runtime.metrics  # noqa: F401

    names = set()
    for collector in list(REGISTRY._collector_to_names):
        for family in collector.describe() if hasattr(collector, "describe") else collector.collect():
            base = family.name
            suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                        "info": ["_info"], "gauge": [""]}.get(family.type, [""])
            names.update(base + s for s in suffixes)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    return [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]


def test_every_queried_metric_is_exported():
    exported = exported_samples()
    queried = {m for q in dashboard_queries() + alert_queries() for m in METRIC.findall(q)}
    assert queried, "no metric found in the queries"
    unknown = sorted(m for m in queried if m not in exported and m not in EXTERNAL)
    assert not unknown, f"queried but not exported: {unknown}"


def test_the_dashboard_covers_what_operators_watch():
    text = " ".join(dashboard_queries())
    for metric in ("prefstream_records_in_total", "kafka_consumergroup_lag", "prefstream_stage_seconds_bucket",
                   "prefstream_routes_total", "prefstream_review_queue_tasks", "prefstream_annotator_alpha",
                   "prefstream_model_info", "prefstream_model_swaps_total", "prefstream_controller_decisions_total",
                   "prefstream_controller_retrain_running", "prefstream_dlq_total"):
        assert metric in text, metric


def test_alerts_cover_stall_dlq_backlog_and_failed_retrain():
    names = {r["alert"] for g in yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())["spec"]["groups"]
             for r in g["rules"]}
    assert names == {"PrefstreamPartitionStalled", "PrefstreamDeadLettersGrowing", "PrefstreamReviewBacklog",
                     "PrefstreamRetrainFailed"}
