"""The demo report's arithmetic on hand-made records (the demo test checks it against real topics)."""

from __future__ import annotations

import pytest

from streams.local.generate import GenerateConfig, generate
from streams.local.report import (
    HOT_SWAP_TARGET_S,
    annotator_agreement,
    ece_by_version,
    hot_swaps,
    human_verdicts,
    noise_by_kind,
    noise_detection,
    phases,
    raw_vs_curated,
    split_precision,
    targets,
)
from streams.local.report_files import hot_swap_rows, model_rows, target_rows, to_html
from streams.review.aggregator import alpha


def _curated(pair: dict, split: str, swap: bool) -> dict:
    p = dict(pair)
    if swap:
        p["chosen"], p["rejected"] = pair["rejected"], pair["chosen"]
    return {"pair": p, "split": split}


def test_noise_detection_precision_and_recall():
    stream = list(generate(GenerateConfig(n=40, seed=1, flip_share=0.5)))
    flipped = [p for p in stream if p["metadata"]["flipped"] == "true"]
    clean = [p for p in stream if p["metadata"]["flipped"] == "false"]
    assert len(flipped) >= 6 and len(clean) >= 6
    curated = {}
    for p in flipped[:4]:  # four flips found: corrected by humans
        curated[p["pair_id"]] = _curated(p, "gold", swap=True)
    curated[clean[0]["pair_id"]] = _curated(clean[0], "flipped", swap=True)  # one false alarm
    for p in clean[1:5]:  # kept as published, rightly
        curated[p["pair_id"]] = _curated(p, "silver", swap=False)
    curated[flipped[4]["pair_id"]] = _curated(flipped[4], "silver", swap=False)  # a missed flip reaches training
    scored = {flipped[5]["pair_id"]: {"route": "dropped", "route_reason": "gold model disagrees (gold_p=0.2)"}}
    nd = noise_detection(stream, scored, curated)
    assert nd["flipped_in_stream"] == len(flipped)
    assert nd["corrected"] == {"flagged": 5, "true_positives": 4, "precision": 0.8, "recall": 4 / len(flipped)}
    assert nd["corrected_by_split"] == {"gold": 4, "flipped": 1}
    assert nd["corrected_or_filtered"]["true_positives"] == 5
    # 10 curated pairs: 4 corrected flips + 4 kept clean pairs are right; the false alarm and the missed flip are not.
    assert nd["curated_label_accuracy"] == 0.8


def test_hot_swaps_only_count_published_versions_and_measure_to_first_use():
    versions = [({"role": "current", "version": "v1", "action": "promote", "announced_at": 1_000}, 0),
                ({"role": "current", "version": "v2", "action": "promote", "announced_at": 10_000}, 0),
                ({"role": "current", "version": "v3", "action": "promote", "announced_at": 20_000}, 0),
                ({"role": "gold", "version": "g1", "action": "promote", "announced_at": 500}, 0)]
    scored = [({"model_version": "v1", "scored_at": 5_000}, 0), ({"model_version": "v2", "scored_at": 12_500}, 0),
              ({"model_version": "v2", "scored_at": 11_500}, 0)]
    decisions = [{"role": "current", "decision": "published", "version": v} for v in ("v2", "v3")]
    got = hot_swaps(versions, scored, decisions)
    assert [(s["version"], s["first_scored_after_s"]) for s in got] == [("v2", 1.5), ("v3", None)]
    assert [s["within_target"] for s in got] == [True, None] and got[0]["target_s"] == HOT_SWAP_TARGET_S
    slow = hot_swaps(versions, [({"model_version": "v2", "scored_at": 10_000 + 2_500}, 0)], decisions)
    assert slow[0]["within_target"] is False


def test_the_report_shows_each_hot_swap_against_the_target():
    rows = hot_swap_rows([{"version": "v2", "announced_at": 1.0, "first_scored_after_s": 1.23, "target_s": 2.0,
                           "within_target": True},
                          {"version": "v3", "announced_at": 9.0, "first_scored_after_s": 2.5, "target_s": 2.0,
                           "within_target": False},
                          {"version": "v4", "announced_at": 20.0, "first_scored_after_s": None, "target_s": 2.0,
                           "within_target": None}])
    assert rows == ["| v2 | 1.23 s | < 2 s met |", "| v3 | 2.50 s | < 2 s missed |", "| v4 | no traffic after it | < 2 s |"]


def test_the_report_carries_each_versions_calibration_error_at_its_own_temperature():
    import numpy as np

    from trainers.evaluation.calibration import calibration_report

    # Holdout margins of an underconfident model: right when the margin is positive, |margin| small.
    margins = np.random.default_rng(0).normal(0.4, 0.5, 300)
    evals = [{"version": "bootstrap", "calibration": calibration_report(margins, 1.0)},
             {"version": "current-1", "calibration": calibration_report(margins, 0.2)},
             {"version": "empty", "calibration": calibration_report([], 1.0)}]
    ece = ece_by_version(evals)
    assert ece["current-1"] < ece["bootstrap"] and ece["empty"] is None  # NaN would not be valid JSON
    rows = model_rows([e | {"holdout_accuracy": 0.8, "style_trap_accuracy": None} for e in evals[:2]], ece)
    assert rows[1].startswith("| current-1 | - | torch | 0.800 | - | 0.2 | ")
    assert f"| {ece['current-1']:.3f} | {ece['bootstrap']:.3f} |" in rows[1]  # ECE, then ECE at T = 1


def test_html_escapes_everything_it_renders():
    page = to_html("# title <script>\n\n| a | <b>x</b> |\n|---|---|\n| 1 | <img src=x onerror=alert(1)> |\n\n"
                   "- item & <i>\n\n![p.png\"onload=\"x](p.png\"onload=\"x)\n")
    assert "<script>" not in page and "<b>x</b>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page and "&amp; &lt;i&gt;" in page
    assert 'src="p.png&quot;onload=&quot;x"' in page


def test_silver_and_flipped_precision_against_the_generators_truth():
    stream = list(generate(GenerateConfig(n=60, seed=2, flip_share=0.4)))
    flipped = [p for p in stream if p["metadata"]["flipped"] == "true"]
    clean = [p for p in stream if p["metadata"]["flipped"] == "false"]
    curated = {p["pair_id"]: _curated(p, "silver", swap=False) for p in clean[:9]}
    curated[flipped[0]["pair_id"]] = _curated(flipped[0], "silver", swap=False)  # a wrong label kept as silver
    curated |= {p["pair_id"]: _curated(p, "flipped", swap=True) for p in flipped[1:4]}  # rightly recycled
    curated[clean[9]["pair_id"]] = _curated(clean[9], "flipped", swap=True)  # a right label swapped
    assert split_precision(stream, curated, "silver") == 0.9
    assert split_precision(stream, curated, "flipped") == 0.75
    assert split_precision(stream, curated, "gold") is None
    hv = human_verdicts([({}, 0)] * 21, curated | {clean[10]["pair_id"]: _curated(clean[10], "gold", swap=False)})
    assert hv["per_curated_pair"] == 21 / 15 and hv["per_human_curated_pair"] == 21.0


def test_noise_caught_per_kind_of_planted_noise():
    stream = list(generate(GenerateConfig(n=400, seed=3, flip_share=0.05, style_flip_share=0.05,
                                          confident_flip_share=0.05, noisy_source_share=0.2)))
    wrong = [p for p in stream if p["metadata"]["flipped"] == "true"]
    style = [p for p in wrong if p["metadata"]["noise"] == "style"]
    curated = {p["pair_id"]: _curated(p, "gold", swap=True) for p in style[:2]}
    scored = {style[2]["pair_id"]: {"route": "dropped", "route_reason": "gold_disagrees"}}
    got = noise_by_kind(stream, scored, curated)
    assert set(got) == {"random", "style", "confident", "source"}
    assert got["style"] == {"wrong_labels": len(style), "caught": 3, "recall": 3 / len(style)}
    assert got["random"]["caught"] == 0 and sum(k["wrong_labels"] for k in got.values()) == len(wrong)


def test_human_share_per_phase_from_the_routes_of_the_pairs_sent_in_it():
    class Run:
        sent_at = {f"p{i}": float(i) for i in range(10)}
        phases = [{"phase": 1, "started": 0.0, "ended": 6.0}, {"phase": 2, "started": 6.0, "ended": 10.0}]
        plan, cfg = None, type("Cfg", (), {"retrains": 1})

    routes = ["review", "review", "silver", "review", "dropped", "silver", "review", "silver", "silver", "flipped"]
    versions = ["v1"] * 5 + ["v2"] * 2 + ["v1"] + ["v2"] * 2  # pair 7 was scored late, by the older version
    scored = [({"pair": {"pair_id": f"p{i}"}, "route": r, "model_version": v}, int(i * 1000 + 500))
              for i, (r, v) in enumerate(zip(routes, versions, strict=True))]
    got = phases(Run(), scored, [{"version": "v1", "holdout_accuracy": 0.8}, {"version": "v2", "holdout_accuracy": 0.9}])
    assert [ph["human_share"] for ph in got] == [0.5, 0.25] and [ph["routed_to_review"] for ph in got] == [3, 1]
    # Beside each phase's human share, the accuracy of the version that scored most of its pairs.
    assert [(ph["serving_version"], ph["model_accuracy"]) for ph in got] == [("v1", 0.8), ("v2", 0.9)]
    rescored = phases(Run(), scored + [({"pair": {"pair_id": "p1"}, "route": "silver"}, 9_000)])
    assert rescored[0]["human_share"] == 2 / 6  # a pair's last record counts, once
    assert got[0]["wrong_label_share"] is None  # the stream did not say which labels are wrong


def test_each_phase_shows_why_pairs_went_to_people_beside_the_share_of_wrong_labels():
    class Run:
        sent_at = {f"p{i}": float(i) for i in range(4)}
        phases = [{"phase": 1, "started": 0.0, "ended": 4.0}]
        plan, cfg = None, type("Cfg", (), {"retrains": 1})

    reasons = ["mispredicted", "uncertain", None, "mispredicted"]
    wrong = ["true", "false", "false", "false"]
    scored = [({"pair": {"pair_id": f"p{i}", "metadata": {"flipped": w}}, "model_version": "v1", "p": 0.05,
                "gold_p": 0.6, "route": "review" if r else "silver", "route_reason": r}, i * 1000 + 500)
              for i, (r, w) in enumerate(zip(reasons, wrong, strict=True))]
    got = phases(Run(), scored, flip_below=0.1)[0]
    assert got["wrong_label_share"] == 0.25
    assert got["review_share_by_reason"] == {"mispredicted": 0.5, "uncertain": 0.25}
    assert got["review_flip_blocked_by_gold"] == 3  # p below flip_below but gold_p not: a person decides


def _arm(holdout: float, non_trap: float, traps: float, confident: float) -> dict:
    mean = {"clean_holdout": holdout, "non_trap": non_trap, "style_traps": traps, "confident_wrong": confident}
    return {"mean": mean, "per_seed": [mean], "ci95": dict.fromkeys(mean)}


def test_raw_versus_curated_reports_the_like_for_like_arms_and_gain():
    like = {"arms": {"raw": _arm(0.8, 0.85, 0.6, 0.3), "curated": _arm(0.9, 0.92, 0.8, 0.9),
                     "truth": _arm(0.92, 0.93, 0.85, 0.95)},
            "by_probe": {"style_traps": {"mean": 0.2}, "confident_wrong": {"mean": 0.6}},
            "gain": 0.1, "gain_ci95": [0.05, 0.15], "ceiling_share": 0.1 / 0.12}
    cmp = raw_vs_curated(like)
    assert cmp["raw"]["holdout_accuracy"] == 0.8 and cmp["curated"]["confident_probe_accuracy"] == 0.9
    assert cmp["truth"]["style_trap_accuracy"] == 0.85 and cmp["gain"] == 0.1 and cmp["gain_ci95"] == [0.05, 0.15]
    assert cmp["style_trap_gain"] == 0.2 and cmp["confident_probe_gain"] == 0.6
    assert raw_vs_curated(None) == {"raw": None, "curated": None, "truth": None, "gain": None, "gain_ci95": None,
                                    "ceiling_share": None, "style_trap_gain": None, "confident_probe_gain": None}


def test_targets_are_judged_from_the_measured_values():
    got = {t["name"]: t for t in targets({"human_share_last_phase": 0.26, "silver_precision": 0.95,
                                          "flipped_precision": 0.9, "curation_gain": 0.06, "loop_vs_batch_gap": -0.02,
                                          "shard_label_accuracy": 0.985,
                                          "flip_detection_precision": None, "flip_detection_recall": 0.95})}
    assert [got[k]["met"] for k in ("human_share_last_phase", "silver_precision", "flipped_precision", "curation_gain",
                                    "loop_vs_batch_gap", "shard_label_accuracy", "flip_detection_precision",
                                    "flip_detection_recall")] == [False, True, False, True, False, True, None, True]
    rows = target_rows([got["human_share_last_phase"], got["flip_detection_precision"]])
    assert rows[0].endswith("| 0.260 | <= 0.25 | missed |") and rows[1].endswith("| - | >= 0.95 | not measured |")


def test_annotator_agreement_by_category_and_the_reannotations_against_the_majority():
    def a(task: str, pair: str, who: str, preferred: str, reannotation: bool = False) -> tuple[dict, int]:
        return ({"task_id": task, "pair_id": pair, "annotator": who, "preferred": preferred, "expert": False,
                 "reannotation": reannotation}, 0)

    anns = [a("t1", "p1", w, "chosen") for w in "xyz"] + [a("t2", "p2", w, v) for w, v in zip("xyz", ["rejected", "rejected", "chosen"], strict=True)]
    anns += [a("t3", "p3", w, "chosen") for w in "xy"] + [a("t4", "p4", w, "rejected") for w in "xyz"]
    anns += [a("r1", "p1", "w", "chosen", True), a("r2", "p2", "w", "chosen", True), a("r3", "p3", "w", "chosen", True)]
    got = annotator_agreement(anns, {"p1": "maths", "p2": "maths", "p3": "poetry"})
    assert set(got["alpha_by_category"]) == {"maths", "poetry", "unknown"}  # p4 has no category
    assert got["alpha_by_category"]["maths"] == pytest.approx(alpha([{"x": "chosen", "y": "chosen", "z": "chosen"},
                                                                     {"x": "rejected", "y": "rejected", "z": "chosen"}]))
    # p3 had two verdicts only, so no majority to compare with; p1 agreed, p2 did not.
    assert got["reannotation"] == {"answers": 2, "agreement": 0.5}
    assert got["tasks"] == 4 and got["verdicts"] == len(anns)
