"""Prometheus metrics of the worker (one registry per process, exported on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

RECORDS_IN = Counter("prefstream_records_in_total", "Records consumed", ["topic"])
RECORDS_OUT = Counter("prefstream_records_out_total", "Records produced", ["topic"])
LATENCY = Histogram("prefstream_processing_seconds", "Time from a record's broker timestamp to its output being committed",
                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
# Where a micro-batch's time goes (ingest, score, label, route, commit): the first thing to read
# when the stream falls behind the model.
STAGE_SECONDS = Histogram("prefstream_stage_seconds", "Seconds per micro-batch spent in each stage", ["stage"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_SIZE = Histogram("prefstream_batch_size", "Records per scoring micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MISPREDICTED = Counter("prefstream_mispredicted_total", "Scored pairs with p < 0.5")
SCORED = Counter("prefstream_scored_total", "Scored pairs")
ROUTES = Counter("prefstream_routes_total", "Routing decisions", ["route", "reason"])
DUPLICATES = Counter("prefstream_duplicates_total", "Records dropped by ingest as resends of a pair_id with the same content")
# Content repeats under another pair_id are dead-lettered: prefstream_dlq_total{reason="duplicate"|"near_duplicate"}.
CONTAMINATED = Counter("prefstream_contaminated_total", "Scored pairs kept out of training because their prompt is in "
                       "an evaluation file of PREFSTREAM_DECONTAMINATE, by file stem", ["file"])
MODEL_VERSION = Info("prefstream_model", "Serving model versions")
SWAPS = Counter("prefstream_model_swaps_total", "Hot-swaps done", ["role"])
SWAP_FAILURES = Counter("prefstream_model_swap_failures_total", "Model versions refused (load or verify failed)", ["role"])
# Announcements a worker did not act on (streams/runtime/announcements.py): not signed by the announcer's key,
# stale, announced for another role than the manifest's, older than the serving version without a rollback, or
# naming a version outside the worker's models store.
ANNOUNCEMENTS_REFUSED = Counter("prefstream_model_announcements_refused_total",
                                "models.versions records refused, by role and reason (unsigned, unknown_key, "
                                "bad_signature, stale, role_mismatch, downgrade, unverifiable, outside_store)",
                                ["role", "reason"])
# Vouches (metadata.answer / metadata.tests) by whether a producer key proved them (curation/trust.py).
VOUCHES_ACCEPTED = Counter("prefstream_vouches_accepted_total",
                           "Pairs whose vouch a producer key of their source signed, by source", ["source"])
VOUCHES_STRIPPED = Counter("prefstream_vouches_stripped_total",
                           "Vouches ignored because no producer key of the pair's source signed the pair, by reason "
                           "(unsigned, unknown_key, bad_signature, source_mismatch)", ["reason"])
SWAP_SECONDS = Histogram("prefstream_model_load_seconds", "Time to load, verify and warm up a new version in the background", ["role"])
SHARD_ROWS = Counter("prefstream_shard_rows_total", "Rows written to shards", ["split"])
READY = Gauge("prefstream_ready", "1 when the worker has its partitions and models")
# 0 when no sandbox (bwrap, user namespaces) works here: the code verifier is off and code pairs take the model route.
CODE_SANDBOX = Gauge("prefstream_code_sandbox_available", "1 when the code verifier's bubblewrap sandbox works on this worker")
# 1 for the mode in use: a memory cgroup per run (cgroup_v1, cgroup_v2), or, where no cgroup can be made,
# an address-space limit of the cap divided by the process limit on each process (rlimit).
CODE_SANDBOX_MEMORY = Gauge("prefstream_code_sandbox_memory_mode",
                            "How a code verifier run's total memory is capped: 1 for the mode in use", ["mode"])
AUDITS = Counter("prefstream_audit_tasks_total",
                 "Silver, flipped and verified_by_tool pairs also sent to human review as blind audits", ["kind"])
# Set by the worker from the controller's per-category thresholds (streams/review/tau.py).
TAU = Gauge("prefstream_router_tau", "Calibrated p at or above which a pair is confident, per task category", ["category"])
# The worker's own view of its group (streams/runtime/assignment.py): the broker cannot be asked (Tansu's
# DescribeGroups has no members, its ListOffsets "latest" is wrong on S3 storage).
PARTITION_ASSIGNED = Gauge("prefstream_partition_assigned", "1 for each partition this worker holds",
                           ["topic", "partition"])
ASSIGNED_PARTITIONS = Gauge("prefstream_assigned_partitions", "Partitions this worker holds")
PARTITION_LAG = Gauge("prefstream_partition_lag",
                      "Records behind on a held partition: the high watermark of the last fetch minus this worker's "
                      "position", ["topic", "partition"])
REBALANCES = Counter("prefstream_rebalances_total", "Group rebalances that gave this worker its partitions")
REBALANCE_SECONDS = Histogram("prefstream_rebalance_seconds",
                              "From subscribe or a revoke to the next assignment: how long the group took",
                              buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120))
# Error-driven expansion (streams/runtime/expansion.py); what the humans then found is on the review side.
EXPANSION = Counter("prefstream_expansion_total",
                    "Error-driven expansion: verdicts that corrected the model (correction), and their neighbours sent "
                    "to review (sent), still confident (confident), past the review budget (over_budget), not to look "
                    "at again (not_eligible: verified, in review, clipped, unknown) or failed", ["outcome"])
