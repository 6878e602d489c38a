"""A shortened `prefstream demo` against the session stack: every pair accounted for, a retrain
published and hot-swapped, the report's numbers equal to what the topics hold, nothing left running."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from streams.local.demo import DemoConfig, stream_config
from streams.local.generate import generate
from tests.helpers import processes_with_env, read_topic, run_cli
from trainers.evaluation.calibration import calibrated_p

pytestmark = pytest.mark.integration


def _service_logs(settings, chars: int = 3000) -> str:
    """The end of each service log of the newest demo run (a failure says where the pairs stopped)."""
    runs = sorted((settings.home / "demo").glob("*/logs"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return "\n(no demo run directory with logs)"
    return "".join(f"\n--- {log.name} (last {chars} characters)\n{log.read_text(errors='replace')[-chars:]}"
                   for log in sorted(runs[-1].glob("*.log")) if log.name != "seed.log")


def test_short_demo_reports_what_the_topics_hold(settings, tmp_path):
    out = tmp_path / "report"
    n = 240
    proc = run_cli(["demo", "--out", str(out), "--pairs", str(n), "--hh-pairs", "0", "--seed-pairs", "60",
                    "--holdout-pairs", "60", "--retrains", "1", "--seed-steps", "4", "--retrain-epochs", "1", "--comparison-seeds", "1",
                    "--max-length", "64", "--rate", "20", "--time-limit", "600"], settings, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:] + _service_logs(settings)
    assert "demo summary" in proc.stderr
    for name in ("report.md", "report.html", "report.json", "accuracy_by_version.png", "reliability.png",
                 "routes_over_time.png", "latency_histogram.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    demo = settings.model_copy(update={"topic_prefix": report["topic_prefix"]})
    assert report["topic_prefix"].startswith(settings.topic_prefix + "demo-")

    # Every pair accounted for: scored once (last record per pair_id) and routed somewhere.
    stream = list(generate(stream_config(DemoConfig(pairs=n))))
    ids = {p["pair_id"] for p in stream}
    scored = {r["pair"]["pair_id"]: r for r in read_topic(demo, "prefs.scored", "ScoredPair")}
    assert ids <= set(scored)
    assert report["pairs"] == {"streamed": n, "generated": n, "hh_rlhf": 0, "scored": n, "scored_records": len(
        read_topic(demo, "prefs.scored", "ScoredPair")), "missing": 0, "dead_letters": 0}
    routes = Counter(scored[i]["route"] for i in ids)
    assert report["routes"] == dict(routes) and sum(routes.values()) == n
    # The generator signs with its key, so the workers honour its answers: nearly all its checkable pairs are
    # verified by a tool (unsigned, only the prompts with an arithmetic expression could be).
    signed = {p["pair_id"] for p in stream if p["source"] == "prefstream-generate" and "answer" in p["metadata"]}
    assert signed and sum(scored[i]["route"] == "verified_by_tool" for i in signed) >= 0.9 * len(signed)
    curated = {r["pair"]["pair_id"]: r for r in read_topic(demo, "prefs.curated", "CuratedPair")}
    assert report["curated_by_split"] == dict(Counter(c["split"] for c in curated.values()))

    # The noise numbers recomputed here from the topics and the generator's truth.
    flipped = {p["pair_id"] for p in stream if p["metadata"]["flipped"] == "true"}
    published = {p["pair_id"]: p for p in stream}
    corrected = {i for i, c in curated.items() if i in ids and c["pair"]["chosen"] != published[i]["chosen"]}
    nd = report["noise_detection"]
    assert nd["flipped_in_stream"] == len(flipped) > 0
    assert nd["corrected"]["flagged"] == len(corrected)
    assert nd["corrected"]["true_positives"] == len(corrected & flipped)
    assert nd["corrected"]["recall"] == pytest.approx(len(corrected & flipped) / len(flipped))
    annotations = read_topic(demo, "prefs.annotations", "Annotation")
    assert report["review"]["verdicts"] == len(annotations) > 0

    # A retrain was published by the controller and then served (hot-swapped) without a restart.
    # The report follows the current role (the gold model retrains too, when its retrain finishes in time).
    published_versions = [d["version"] for d in report["controller"] if d["decision"] == "published" and d["role"] == "current"]
    assert published_versions, report["controller"]
    served = {r["model_version"] for r in scored.values()}
    assert set(published_versions) & served, "no retrained version ever scored a pair"
    assert any(s["first_scored_after_s"] is not None for s in report["hot_swaps"])
    versions = [m["version"] for m in report["models"]]
    assert versions[0] == "bootstrap" and set(published_versions) <= set(versions)
    # Each version scored with its own calibration temperature; the report carries its ECE on the holdout.
    temperature = {m["version"]: m["calibration"]["temperature"] for m in report["models"]}
    assert set(report["ece_by_version"]) == set(versions)
    for r in scored.values():
        if r["model_version"] in temperature:
            assert r["temperature"] == pytest.approx(temperature[r["model_version"]])
            p = calibrated_p(r["reward_chosen"] - r["reward_rejected"], r["temperature"])
            assert r["p"] == pytest.approx(float(p), abs=1e-5)
    assert report["failures"] == []
    # Curation against the raw stream, like for like: the served version's chain replayed from its base with
    # raw, curated and true labels on the same pairs; each label's precision and the human share recomputed from
    # the topics and the generator's truth.
    served_last = [m for m in report["models"] if m["role"] == "current" and not m["rolled_back"]][-1]
    assert report["curated_accuracy"] == served_last["holdout_accuracy"]
    like, cmp = report["like_for_like"], report["raw_vs_curated"]
    assert like["version"] == served_last["version"] and like["base"] == served_last["parent"]
    assert set(like["arms"]) == {"raw", "curated", "truth"} and like["seeds"] == [0]
    assert 0 < like["pairs"] <= len(curated) and like["pairs_without_truth"] == 0
    assert like["pairs_curated_label_differs"] <= len(corrected)
    means = {a: like["arms"][a]["mean"] for a in like["arms"]}
    assert report["raw_trained_accuracy"] == means["raw"]["clean_holdout"] == cmp["raw"]["holdout_accuracy"]
    assert cmp["gain"] == pytest.approx(means["curated"]["clean_holdout"] - means["raw"]["clean_holdout"])
    assert cmp["truth"]["confident_probe_accuracy"] == means["truth"]["confident_wrong"]
    batch = report["loop_vs_batch"]
    assert batch["served"] == report["curated_accuracy"] and batch["gap"] == pytest.approx(batch["served"] - batch["batch"])
    assert batch["steps"] == sum(m["lineage"]["steps"] for m in report["models"] if m["version"] == like["version"])
    assert all(ph["serving_version"] in {m["version"] for m in report["models"]} for ph in report["phases"])
    truth = {p["pair_id"]: (p["chosen"] if p["metadata"]["truth"] == "chosen" else p["rejected"]) for p in stream}
    for split, key in (("silver", "silver_precision"), ("flipped", "flipped_precision")):
        mine = [c for i, c in curated.items() if c["split"] == split]
        want = sum(c["pair"]["chosen"] == truth[c["pair"]["pair_id"]] for c in mine) / len(mine) if mine else None
        assert report[key] == pytest.approx(want), key
    shares = report["human_share_by_phase"]
    assert len(shares) == len(report["phases"]) == 2
    assert sum(ph["routed_to_review"] for ph in report["phases"]) == routes["review"]
    assert all(s is None or 0 <= s <= 1 for s in shares)
    assert report["human_verdicts"]["verdicts"] == len(annotations)
    assert {t["name"] for t in report["targets"]} >= {"curation_gain", "silver_precision", "human_share_last_phase"}
    # The plan was sized from Stage 1's speed, shown at start and kept in the report.
    assert report["plan"]["retrains"] == 1 and report["plan"]["retrain_estimate_s"] > 0
    assert "plan: 1 retrain(s), 2 phases of 120 pairs" in proc.stderr.replace("\n", "")

    # The markdown shows the same numbers, escaped HTML beside it, and no service outlived the demo.
    md = (out / "report.md").read_text()
    assert f"| {n} | {n} | 0 | {n} | 0 | 0 |" in md
    assert "<table>" in (out / "report.html").read_text()
    assert processes_with_env("PREFSTREAM_TOPIC_PREFIX", report["topic_prefix"]) == []
