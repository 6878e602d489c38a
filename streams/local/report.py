"""The demo report: numbers computed from the records in the topics, written as JSON, markdown,
HTML and PNG plots.

Every count here is recomputed from what the pipeline wrote (prefs.scored, prefs.curated,
prefs.annotations, models.versions, prefs.dlq) joined with the generator's known truth, so the
report cannot claim what the stream did not do.

Every count is also deduplicated on the record's identity (streams.kafka.reader.identity): the
embedded broker (Tansu) delivers the records of aborted transactions to read_committed readers, so
a batch that the worker or the aggregator aborted and redid would otherwise be counted twice
(scored records, throughput, latency, verdicts, dead letters). On Apache Kafka nothing is dropped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from schemas.records import UNRANKED_SPLITS
from streams.kafka import topics
from streams.kafka.reader import read_topic, unique
from streams.local.curation import (
    like_for_like,
    loop_vs_batch,
    probes,
)
from streams.local.generate import truly_better
from streams.review import audit, neighbour_tasks
from streams.review.aggregator import decide
from streams.review.queue import VOTES_NEEDED
from streams.settings import Settings, WorkerSettings
from trainers.evaluation.evaluate import evaluate_versions
from trainers.exceptions import TrainerError
from trainers.storage.registry import BOOTSTRAP_VERSION

log = logging.getLogger(__name__)
PEAK_WINDOW_S = 10.0
# Announcement on models.versions to the first pair scored by the new version: the load, verification
# and warm-up happen in the worker's background before it, the swap itself between two batches.
HOT_SWAP_TARGET_S = 2.0


def _read(settings: Settings, topic: str, schema: str, idle: float = 3.0) -> list[tuple[dict, int]]:
    """(record, broker timestamp ms) for each identity of a logical topic (``dedupe``)."""
    return dedupe(schema, [(r.value, r.timestamp_ms) for r in read_topic(settings, topic, schema, idle_timeout=idle)])


def dedupe(schema: str, records: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
    """One (record, timestamp) per identity, the last one read: a batch aborted and redone reaches a
    read_committed reader twice on the embedded broker, and each copy would count again."""
    return unique(schema, records, value=lambda item: item[0])


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def precision_recall(flagged: set[str], truth: set[str]) -> dict[str, Any]:
    tp = len(flagged & truth)
    return {"flagged": len(flagged), "true_positives": tp,
            "precision": tp / len(flagged) if flagged else None, "recall": tp / len(truth) if truth else None}


def noise_detection(stream: list[dict], scored: dict[str, dict], curated: dict[str, dict]) -> dict[str, Any]:
    """Precision and recall of finding the deliberately flipped labels.

    corrected: the pair reached the training shards with its label swapped (human review,
    verifier, or label-flip recycling). filtered: corrected, or removed by the gold-model
    consistency filter (route 'dropped' because the gold model disagreed).
    """
    known = {p["pair_id"]: p for p in stream if (p.get("metadata") or {}).get("flipped") in ("true", "false")}
    flipped = {i for i, p in known.items() if p["metadata"]["flipped"] == "true"}
    corrected: set[str] = set()
    by: Counter[str] = Counter()
    for i, c in curated.items():
        if i in known and c["pair"]["chosen"] != known[i]["chosen"]:
            corrected.add(i)
            by[c["split"]] += 1
    filtered = corrected | {i for i, s in scored.items() if i in known and s.get("route") == "dropped"
                            and "gold" in (s.get("route_reason") or "")}
    right = sum(1 for i, c in curated.items() if i in known and c["pair"]["chosen"] == truly_better(known[i]))
    n_cur = sum(1 for i in curated if i in known)
    return {"pairs_with_known_truth": len(known), "flipped_in_stream": len(flipped),
            "corrected": precision_recall(corrected, flipped), "corrected_by_split": dict(by),
            "corrected_or_filtered": precision_recall(filtered, flipped),
            "stream_label_accuracy": 1 - len(flipped) / len(known) if known else None,
            "curated_label_accuracy": right / n_cur if n_cur else None, "curated_pairs_with_known_truth": n_cur}


# Targets at the demo's default sizes: (report key, comparison, bound, what it measures).
TARGETS = (
    ("human_share_last_phase", "<=", 0.25, "share of pairs routed to human review in the last phase"),
    ("silver_precision", ">=", 0.95, "silver pairs whose label is right"),
    ("flipped_precision", ">=", 0.95, "recycled (flipped) pairs whose corrected label is right"),
    ("shard_label_accuracy", ">=", 0.98, "curated pairs whose chosen side is the truly better one"),
    ("curation_gain", ">=", 0.05, "like for like: clean-holdout accuracy of the chain replayed on curated labels "
                                  "minus on raw labels (mean over seeds)"),
    ("loop_vs_batch_gap", ">=", -0.01, "served version minus one batch training on all curated pairs, same compute"),
    ("flip_detection_precision", ">=", 0.95, "flagged labels (corrected or filtered) that were really wrong"),
    ("flip_detection_recall", ">=", 0.90, "wrong labels that were corrected or filtered"),
)


def split_precision(stream: list[dict], curated: dict[str, dict], split: str) -> float | None:
    """Share of the curated pairs of ``split`` whose chosen side is the generator's truly better one."""
    known = {p["pair_id"]: p for p in stream if (p.get("metadata") or {}).get("truth") in ("chosen", "rejected")}
    mine = [(i, c) for i, c in curated.items() if c["split"] == split and i in known]
    return sum(c["pair"]["chosen"] == truly_better(known[i]) for i, c in mine) / len(mine) if mine else None


def human_verdicts(annotations: list[tuple[dict, int]], curated: dict[str, dict]) -> dict[str, Any]:
    """Human verdicts spent per curated pair, overall and per pair curated by human review (split gold)."""
    n, gold = len(annotations), sum(1 for c in curated.values() if c["split"] == "gold")
    return {"verdicts": n, "curated_pairs": len(curated), "human_curated_pairs": gold,
            "per_curated_pair": n / len(curated) if curated else None, "per_human_curated_pair": n / gold if gold else None}


def targets(values: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it was met (None when not measured)."""
    out = []
    for key, op, bound, what in TARGETS:
        v = values.get(key)
        met = None if v is None else (v <= bound if op == "<=" else v >= bound)
        out.append({"name": key, "what": what, "target": f"{op} {bound:g}", "value": v, "met": met})
    return out


def curation_proof(run: Any, data: dict[str, list[dict]], final: dict) -> tuple[dict | None, dict | None]:
    """(like for like, loop versus batch) for the served version (streams/local/curation.py); (None, None)
    when the demo skips them or the served version is Stage 1's."""
    cfg = run.cfg
    if not getattr(cfg, "comparison", False) or final.get("parent") is None:
        return None, None
    published: dict[str, dict] = {}
    for r in read_topic(run.settings, topics.RAW, "PreferencePair", idle_timeout=1.0):
        published[r.value["pair_id"]] = r.value  # the last record per pair_id, as the worker saw it
    sets = probes(data["holdout"], data["probe"])
    stream = {p["pair_id"]: p for p in data["stream"]}
    seeds = list(range(cfg.comparison_seeds))
    try:
        like = like_for_like(run.settings.models_dir, final["version"], published, stream, sets, seeds,
                             on_arm=lambda arm, seed: log.info("like for like: arm %s, seed %d", arm, seed))
        batch = loop_vs_batch(run.settings.models_dir, run.settings.shards_dir, final["version"],
                              final["holdout_accuracy"], data["holdout"])
    except TrainerError as exc:  # a chain that cannot be replayed is reported, not a crash of the report
        run.warnings.append(f"no like-for-like comparison: {exc}")
        return None, None
    return like, batch


def noise_by_kind(stream: list[dict], scored: dict[str, dict], curated: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per kind of planted noise (metadata.noise): wrong labels, and how many were corrected or filtered."""
    out: dict[str, dict[str, Any]] = {}
    for p in stream:
        meta = p.get("metadata") or {}
        if meta.get("flipped") != "true":
            continue
        kind = out.setdefault(meta.get("noise") or "random", {"wrong_labels": 0, "caught": 0})
        kind["wrong_labels"] += 1
        c, s = curated.get(p["pair_id"]), scored.get(p["pair_id"]) or {}
        if (c is not None and c["pair"]["chosen"] != p["chosen"]) or (
                s.get("route") == "dropped" and "gold" in (s.get("route_reason") or "")):
            kind["caught"] += 1
    for kind in out.values():
        kind["recall"] = kind["caught"] / kind["wrong_labels"]
    return out


def hot_swaps(versions: list[tuple[dict, int]], scored: list[tuple[dict, int]], decisions: list[dict]) -> list[dict[str, Any]]:
    """For each version the controller published: announcement -> first pair scored by it (seconds)."""
    published = {d.get("version") for d in decisions if d["decision"] == "published" and d["role"] == "current"}
    first: dict[str, int] = {}
    for rec, _ in scored:
        v = rec["model_version"]
        first[v] = min(first.get(v, rec["scored_at"]), rec["scored_at"])
    out = []
    for rec, _ in versions:
        if rec["role"] != "current" or rec["version"] not in published or rec["action"] != "promote":
            continue
        seen = first.get(rec["version"])
        after = (seen - rec["announced_at"]) / 1000 if seen else None
        out.append({"version": rec["version"], "announced_at": rec["announced_at"] / 1000,
                    "first_scored_after_s": after, "target_s": HOT_SWAP_TARGET_S,
                    "within_target": after < HOT_SWAP_TARGET_S if after is not None else None})
    return out


def ece_by_version(evals: list[dict[str, Any]]) -> dict[str, float | None]:
    """Expected calibration error on the clean holdout of each version, at the version's own temperature."""
    out: dict[str, float | None] = {}
    for e in evals:
        ece = e["calibration"]["ece"]
        out[e["version"]] = None if ece != ece else ece  # NaN (no pairs) is not JSON
    return out


def annotator_agreement(annotations: list[tuple[dict, int]], category_of: dict[str, str] | None = None) -> dict[str, Any]:
    """Alpha over every task with two or more verdicts, overall and per task category (``category_of``:
    pair_id -> category), and the blind re-annotations against their task's majority."""
    from streams.review.aggregator import alpha, decide

    units: dict[str, dict[str, str]] = defaultdict(dict)
    pair_of: dict[str, str] = {}
    reannotations: list[dict] = []
    experts = 0
    for a, _ in annotations:
        if a["expert"]:
            experts += 1
        elif a["reannotation"]:
            reannotations.append(a)
        else:
            units[a["task_id"]][a["annotator"]] = a["preferred"]
            pair_of[a["task_id"]] = a["pair_id"]
    full = {tid: u for tid, u in units.items() if len(u) >= 2}
    by_category: dict[str, list[dict[str, str]]] = defaultdict(list)
    for tid, u in full.items():
        by_category[(category_of or {}).get(pair_of[tid]) or "unknown"].append(u)
    majority = {pair_of[tid]: d.preferred for tid, u in full.items()
                if len(u) >= 3 and (d := decide(list(u.values()))).kind == "verified"}
    checked = [a["preferred"] == majority[a["pair_id"]] for a in reannotations if a["pair_id"] in majority]
    return {"verdicts": len(annotations), "tasks": len(units), "expert_verdicts": experts,
            "alpha": alpha(list(full.values())) if full else None,
            "alpha_by_category": {c: alpha(us) for c, us in sorted(by_category.items())},
            "reannotation": {"answers": len(checked), "agreement": sum(checked) / len(checked) if checked else None}}


def throughput(scored: list[tuple[dict, int]], window_s: float = PEAK_WINDOW_S) -> dict[str, float | None]:
    """Scored pairs per second over the run and in its busiest ``window_s`` seconds."""
    times = sorted(ts / 1000 for _, ts in scored if ts > 0)
    peak, start = 0.0, 0
    for end, t in enumerate(times):
        while times[start] < t - window_s:
            start += 1
        peak = max(peak, (end - start + 1) / window_s)
    overall = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"scored_per_s_overall": overall, "scored_per_s_peak_10s": peak}


def raw_vs_curated(like: dict[str, Any] | None) -> dict[str, Any]:
    """The like-for-like arms' mean accuracies, and the gain on the clean holdout (None without a comparison)."""
    def arm(name: str) -> dict[str, Any] | None:
        if like is None:
            return None
        mean = like["arms"][name]["mean"]
        return {"holdout_accuracy": mean["clean_holdout"], "non_trap_accuracy": mean["non_trap"],
                "style_trap_accuracy": mean["style_traps"], "confident_probe_accuracy": mean["confident_wrong"]}

    out: dict[str, Any] = {"raw": arm("raw"), "curated": arm("curated"), "truth": arm("truth"),
                           "gain": like["gain"] if like else None, "gain_ci95": like["gain_ci95"] if like else None,
                           "ceiling_share": like["ceiling_share"] if like else None}
    out["style_trap_gain"] = like["by_probe"]["style_traps"]["mean"] if like else None
    out["confident_probe_gain"] = like["by_probe"]["confident_wrong"]["mean"] if like else None
    return out


def phases(run: Any, scored: list[tuple[dict, int]], evals: list[dict[str, Any]] | None = None,
           flip_below: float = 0.1) -> list[dict[str, Any]]:
    """Pairs, rate, latency and human share of each streaming phase (by when each pair was sent), beside the
    clean-holdout accuracy of the version that served most of the phase's pairs and why pairs went to review."""
    accuracy = {e["version"]: e["holdout_accuracy"] for e in evals or []}
    out = []
    for phase in run.phases:
        in_phase = [(rec, ts) for rec, ts in scored
                    if phase["started"] <= run.sent_at.get(rec["pair"]["pair_id"], 0) < phase["ended"]]
        latency = [ts / 1000 - run.sent_at[rec["pair"]["pair_id"]] for rec, ts in in_phase if ts > 0]
        span = phase["ended"] - phase["started"]
        last = {rec["pair"]["pair_id"]: rec for rec, _ in in_phase}  # a pair's last record is the one that counts
        human = sum(1 for rec in last.values() if rec.get("route") == "review")
        serving = Counter(rec.get("model_version") for rec in last.values()).most_common(1)
        version = serving[0][0] if serving else None
        reviewed = [rec for rec in last.values() if rec.get("route") == "review"]
        # Pairs whose published label is wrong (where the stream knows its truth) go to people unless both
        # models flip them: the floor under the "mispredicted" share, whatever the model learns.
        known = [(rec["pair"].get("metadata") or {}).get("flipped") for rec in last.values()]
        known = [k for k in known if k in ("true", "false")]
        out.append({"phase": phase["phase"], "pairs": len(in_phase), "seconds": round(span, 1),
                    "serving_version": version, "model_accuracy": accuracy.get(version),
                    "routed_to_review": human, "human_share": human / len(last) if last else None,
                    # Why pairs went to people: the router's reason, and how many the served model alone would
                    # have flipped (p below flip_below) had the gold model agreed.
                    "review_reasons": dict(Counter((rec.get("route_reason") or "?").split(" (")[0] for rec in reviewed)),
                    "review_flip_blocked_by_gold": sum(1 for rec in reviewed if rec.get("p") is not None
                                                       and rec["p"] < flip_below and (rec.get("gold_p") or 1) >= flip_below),
                    "wrong_label_share": known.count("true") / len(known) if known else None,
                    "review_share_by_reason": {k: v / len(last) for k, v in Counter(
                        (rec.get("route_reason") or "?").split(" (")[0] for rec in reviewed).items()},
                    "pairs_per_s": len(in_phase) / span if span > 0 else None,
                    "p50_s": _pct(latency, 50), "p99_s": _pct(latency, 99),
                    "training_alongside": phase["phase"] <= (run.plan.retrains if run.plan else run.cfg.retrains)})
    return out


def audits(annotations: list[tuple[dict, int]], curated: dict[str, dict], audit_tasks: set[str]) -> dict[str, Any]:
    """The blind audits of silver, flipped and verified_by_tool pairs, decided by the human majority as the aggregator
    decides them (streams/review/audit.py), per kind and task category. ``audit_tasks``: the ids of the
    audit tasks on prefs.review (an id alone does not tell, streams/review/task_ids.py)."""
    votes: dict[str, dict[str, str]] = defaultdict(dict)
    for ann, _ in annotations:
        if ann["task_id"] in audit_tasks:
            votes[ann["pair_id"]][ann["annotator"]] = ann["preferred"]
    counts: dict[tuple[str, str], audit.AuditCount] = {}
    for pair_id, by_annotator in votes.items():
        split = (curated.get(pair_id) or {}).get("split")
        if split not in audit.KINDS or len(by_annotator) < VOTES_NEEDED:
            continue
        d = decide(list(by_annotator.values())[:VOTES_NEEDED])
        outcome = audit.outcome(split, d.preferred if d.kind == "verified" else None)
        count = counts.setdefault((curated[pair_id]["pair"].get("task_category") or "unknown", split), audit.AuditCount())
        setattr(count, outcome, getattr(count, outcome) + 1)
    return {"tasks_answered": len(votes), "by_kind": audit.summary(counts)}


def kept_out(scored: dict[str, dict], dlq: list[tuple[dict, int]]) -> dict[str, int]:
    """Pairs kept out of training before routing: repeats dead-lettered by content (duplicate, near_duplicate) and
    scored pairs whose prompt is in an evaluation file (PREFSTREAM_DECONTAMINATE)."""
    reasons = Counter(rec["reason"] for rec, _ in dlq)
    return {"duplicate": reasons["duplicate"], "near_duplicate": reasons["near_duplicate"],
            "contaminated": sum((rec.get("route_reason") or "").startswith("contaminated:") for rec in scored.values())}


def neighbour_expansion(review_tasks: list[dict], stream: list[dict], gold: dict[str, dict]) -> dict[str, Any]:
    """The ``neighbour_of_error`` tasks of the error-driven expansion (streams/runtime/expansion.py): how many,
    how many were about planted noise (a pair whose published label the generator flipped), and of those how
    many the humans then corrected (a gold record preferring the other response)."""
    by_id = {p["pair_id"]: p for p in stream}
    about = {t["pair"]["pair_id"] for t in review_tasks if neighbour_tasks.reviewed_route(t["reason"])}
    planted = {i for i in about if ((by_id.get(i) or {}).get("metadata") or {}).get("flipped") == "true"}
    corrected = {i for i in planted if i in gold and gold[i]["pair"]["chosen"] == by_id[i]["rejected"]}
    return {"tasks": len(about), "planted_noise": len(planted), "planted_noise_corrected": len(corrected)}


def build(run: Any, data: dict[str, list[dict]], decisions: list[dict]) -> dict[str, Any]:
    s, cfg = run.settings, run.cfg
    scored_raw = _read(s, topics.SCORED, "ScoredPair")
    curated_raw = _read(s, topics.CURATED, "CuratedPair")
    annotations = _read(s, topics.ANNOTATIONS, "Annotation")
    review_tasks = [t for t, _ in _read(s, topics.REVIEW, "ReviewTask")]
    audit_tasks = {t["task_id"] for t in review_tasks if audit.kind_of(t) is not None}
    versions = _read(s, topics.MODEL_VERSIONS, "ModelVersion")
    dlq = _read(s, topics.DLQ, "DeadLetter", idle=1.0)
    stream = data["stream"]
    ids = {p["pair_id"] for p in stream}
    scored: dict[str, dict] = {}
    for rec, _ in scored_raw:
        scored[rec["pair"]["pair_id"]] = rec  # the last record per pair_id is the one that counts
    curated: dict[str, dict] = {}
    for rec, _ in curated_raw:
        curated[rec["pair"]["pair_id"]] = rec
    routes = Counter(scored[i].get("route") or "none" for i in ids if i in scored)
    latency = [ts / 1000 - run.sent_at[rec["pair"]["pair_id"]] for rec, ts in scored_raw
               if rec["pair"]["pair_id"] in run.sent_at and ts > 0]
    rolled_back = {d.get("version") for d in decisions if d["decision"] == "rolled_back"}
    evals = evaluate_versions(s.models_dir, data["holdout"], cfg.max_length)
    for e in evals:
        e["rolled_back"] = e["version"] in rolled_back
    initial = next((e for e in evals if e["role"] == "current" and e["version"] != BOOTSTRAP_VERSION), None)
    final = [e for e in evals if e["role"] == "current" and not e["rolled_back"]][-1]
    t0 = time.time()
    like, batch = curation_proof(run, data, final)
    if like is not None:
        run.stage_seconds["like-for-like comparison and batch run"] = round(time.time() - t0, 1)
    # Ties and both-bad verdicts are kept in the shards but prefer neither side: no label to be right or wrong.
    ranked = {i: c for i, c in curated.items() if c["split"] not in UNRANKED_SPLITS}
    noise = noise_detection(stream, scored, ranked)
    by_phase = phases(run, scored_raw, evals, WorkerSettings().flip_below)
    comparison = raw_vs_curated(like)
    measured = {"human_share_last_phase": by_phase[-1]["human_share"] if by_phase else None,
                "silver_precision": split_precision(stream, curated, "silver"),
                "flipped_precision": split_precision(stream, curated, "flipped"), "curation_gain": comparison["gain"],
                "shard_label_accuracy": noise["curated_label_accuracy"],
                "loop_vs_batch_gap": batch["gap"] if batch else None,
                "flip_detection_precision": noise["corrected_or_filtered"]["precision"],
                "flip_detection_recall": noise["corrected_or_filtered"]["recall"]}
    report = {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"), "topic_prefix": s.topic_prefix,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "pairs": {"streamed": len(stream), "generated": sum(1 for p in stream if p["pair_id"].startswith("gen-")),
                  "hh_rlhf": sum(1 for p in stream if not p["pair_id"].startswith("gen-")),
                  "scored": len(ids & set(scored)), "scored_records": len(scored_raw),
                  "missing": len(ids - set(scored)), "dead_letters": len(dlq)},
        "routes": dict(routes), "curated_by_split": dict(Counter(c["split"] for c in curated.values())),
        "kept_out": kept_out(scored, dlq),
        "noise_detection": noise | {"by_kind": noise_by_kind(stream, scored, ranked)},
        "models": evals,
        "ece_by_version": ece_by_version(evals),
        "human_share_by_phase": [ph["human_share"] for ph in by_phase],
        "silver_precision": measured["silver_precision"], "flipped_precision": measured["flipped_precision"],
        "human_verdicts": human_verdicts(annotations, curated),
        "audits": audits(annotations, curated, audit_tasks),
        "neighbour_expansion": neighbour_expansion(
            review_tasks, stream, {rec["pair"]["pair_id"]: rec for rec, _ in curated_raw if rec["split"] == "gold"}),
        "curated_accuracy": final["holdout_accuracy"],
        "raw_trained_accuracy": comparison["raw"]["holdout_accuracy"] if comparison["raw"] else None,
        "raw_vs_curated": comparison, "like_for_like": like, "loop_vs_batch": batch,
        "targets": targets(measured),
        "retrained_beats_initial": bool(initial and final is not initial
                                        and final["holdout_accuracy"] > initial["holdout_accuracy"]),
        "hot_swaps": hot_swaps(versions, scored_raw, decisions),
        "review": annotator_agreement(annotations, {i: rec["pair"].get("task_category") for i, rec in scored.items()})
                  | {"simulated": run.annotator_stats},
        "throughput": throughput(scored_raw) | {"produce_rate": cfg.rate, "max_in_flight": cfg.max_in_flight},
        "latency_s": {"p50": _pct(latency, 50), "p99": _pct(latency, 99), "n": len(latency)},
        "phases": by_phase,
        "controller": [{k: d[k] for k in ("time", "role", "decision", "reason", "version", "category", "shift_from",
                                          "shift_to") if k in d} for d in decisions],
        "stage_seconds": run.stage_seconds, "failures": list(run.failures), "warnings": list(run.warnings),
        "plan": asdict(run.plan) if run.plan else None,
    }
    report["_series"] = {"latency": latency,
                         "routes": [(rec["scored_at"] / 1000, rec.get("route") or "none") for rec, _ in scored_raw]}
    return report
