"""Prometheus metrics of the review side: the review app and the aggregator (exported on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

# Annotations the aggregator dead-letters because the review app did not sign them (provenance.py).
ANNOTATIONS_REFUSED = Counter("prefstream_annotations_refused_total",
                              "Annotations without the review app's valid signature, by reason", ["reason"])
ALPHA = Gauge("prefstream_annotator_alpha", "Rolling Krippendorff's alpha of annotator verdicts", ["category"])
REANNOTATION_AGREEMENT = Gauge("prefstream_reannotation_agreement",
                               "Share of blind re-annotations that agreed with the verified label")
# Set by the review app when /metrics is scraped, from the Redis queue (the dashboard and the backlog alert).
QUEUE_TASKS = Gauge("prefstream_review_queue_tasks", "Review tasks waiting in the Redis queue, by queue (pending, expert)", ["state"])
# Set by the review app when /metrics is scraped, from the audit counts in Redis (audit.py).
AUDIT_PRECISION = Gauge("prefstream_audit_precision", "Share of audited automatic labels the human majority confirmed",
                        ["kind", "category"])
AUDITED = Gauge("prefstream_audited_pairs", "Audits decided by a human majority", ["kind", "category"])
# What the humans found in the neighbour_of_error tasks of the worker's error-driven expansion (neighbour_tasks.py).
EXPANSION_CAUGHT = Counter("prefstream_expansion_caught_total",
                           "neighbour_of_error tasks whose human verdict overturned the automatic label, by the "
                           "pair's route", ["route"])
EXPANSION_CONFIRMED = Counter("prefstream_expansion_confirmed_total",
                              "neighbour_of_error tasks whose human verdict kept the automatic label, by the pair's "
                              "route", ["route"])
