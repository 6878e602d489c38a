"""Reward-model evaluation (`prefstream eval`): pairwise accuracy, Best-of-N, style bias, the
benchmarks' own scores (RewardBench sections, RM-Bench's 3x3 matrix) and the holdout accuracy of
model versions. The files are read by ``trainers.evaluation.benchmarks``.

Accuracy is strict: a tie (equal rewards) counts as wrong. Calibration (ECE and a reliability
diagram, trainers/evaluation/calibration.py) is over the pairs, with p = sigmoid(margin / T) at the model
version's own temperature.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from schemas.pairs import validate_pair
from trainers.evaluation.benchmarks import (
    EVAL_FORMATS,
    REWARDBENCH_SECTIONS,
    REWARDBENCH_WEIGHTS,
    is_style_trap,
    read_eval_items,
    read_regression_pairs,
)
from trainers.evaluation.calibration import calibration_report
from trainers.exceptions import DataError

__all__ = ["EVAL_FORMATS", "evaluate", "evaluate_versions", "holdout_accuracy", "is_style_trap", "markdown_table",
           "read_eval_items", "read_regression_pairs", "reliability_table", "rewardbench_scores"]


# ---------------------------------------------------------------------------- metrics
def _acc(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def rewardbench_scores(subset_accuracy: dict[str, float]) -> dict[str, Any]:
    """RewardBench's section scores (fractions, not its percent) and their mean, from per-subset accuracy.

    A section none of whose subsets is present is left out (and named), so a partial file gives a
    partial score instead of a wrong zero; subsets outside the mapping count in no section.
    """
    sections = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        if present:
            weight = sum(REWARDBENCH_WEIGHTS[s] for s in present)
            sections[section] = sum(subset_accuracy[s] * REWARDBENCH_WEIGHTS[s] for s in present) / weight
    return {"sections": sections, "score": float(np.mean(list(sections.values()))) if sections else float("nan"),
            "missing_sections": [s for s in REWARDBENCH_SECTIONS if s not in sections],
            "unmapped_subsets": sorted(set(subset_accuracy) - set(REWARDBENCH_WEIGHTS))}


def _rmbench(matrix: np.ndarray, n: int) -> dict[str, Any]:
    # RM-Bench: rows = chosen style, cols = rejected style (concise, detailed, markdown). Hard = the chosen
    # answer is plainer than the rejected one (upper triangle), easy = the reverse.
    m = matrix / n
    return {"easy": float(np.mean(m[np.tril_indices(3, -1)])), "normal": float(np.mean(np.diag(m))),
            "hard": float(np.mean(m[np.triu_indices(3, 1)])), "average": float(m.mean()),
            "matrix": m.round(4).tolist(), "items": n}


def evaluate(rm: Any, items: list[dict], temperature: float = 1.0) -> dict[str, Any]:
    """All metrics the items allow. ``rm`` needs ``score(conversations, responses)``; ``temperature``
    is the version's calibration temperature (RewardModel.temperature) for the pairs' calibration."""
    convs, resps, owners = [], [], []
    for i, it in enumerate(items):
        responses = {"pair": [it.get("chosen"), it.get("rejected")], "best_of_n": it.get("candidates"),
                     "rmbench": (it.get("chosen") or []) + (it.get("rejected") or [])}[it["kind"]]
        if responses is None:  # read_eval_items gives every best_of_n item its candidates
            raise DataError(f"evaluation item {i} ({it['kind']}) has no 'candidates'")
        for r in responses:
            convs.append(it["conversation"])
            resps.append(r)
            owners.append(i)
    scores = rm.score(convs, resps) if resps else np.zeros(0)
    per_item: dict[int, list[float]] = defaultdict(list)
    for i, s in zip(owners, scores, strict=True):
        per_item[i].append(float(s))

    pair_ok: list[bool] = []
    margins: list[float] = []
    by_cat: dict[str, list[bool]] = defaultdict(list)
    by_obj: dict[str, list[bool]] = defaultdict(list)
    by_rb_subset: dict[str, list[bool]] = defaultdict(list)
    style: list[bool] = []
    bon: list[bool] = []
    bon_by_cat: dict[str, list[bool]] = defaultdict(list)
    matrices: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((3, 3)))
    n_rm: dict[str, int] = defaultdict(int)
    for i, it in enumerate(items):
        s = per_item[i]
        if it["kind"] == "pair":
            ok = s[0] > s[1]
            pair_ok.append(ok)
            margins.append(s[0] - s[1])
            by_cat[it["category"]].append(ok)
            by_obj[it["objectivity"]].append(ok)
            if "rb_subset" in it:
                by_rb_subset[it["rb_subset"]].append(ok)
            if it["style_trap"]:
                style.append(ok)
        elif it["kind"] == "best_of_n":
            best = it["best"]
            # Ranked first means strictly above every other candidate (RMB's Best-of-N accuracy).
            ok = all(s[best] > v for j, v in enumerate(s) if j != best)
            bon.append(ok)
            bon_by_cat[it.get("category") or "best-of-n"].append(ok)
        else:
            c, r = s[:3], s[3:]
            cell = np.array([[c[a] > r[b] for b in range(3)] for a in range(3)], dtype=float)
            for key in ("all", it.get("category") or "rmbench"):
                matrices[key] += cell
                n_rm[key] += 1
    report: dict[str, Any] = {"items": len(items)}
    if pair_ok:
        report["pairwise_accuracy"] = _acc(pair_ok)
        report["pairs"] = len(pair_ok)
        report["by_category"] = {k: {"accuracy": _acc(v), "n": len(v)} for k, v in sorted(by_cat.items())}
        report["by_objectivity"] = {k: {"accuracy": _acc(v), "n": len(v)} for k, v in sorted(by_obj.items())}
        report["style_trap_accuracy"] = _acc(style)
        report["style_trap_pairs"] = len(style)
        report["calibration"] = calibration_report(margins, temperature)
    if by_rb_subset:
        report["rewardbench"] = rewardbench_scores({k: _acc(v) for k, v in by_rb_subset.items()})
    if bon:
        report["best_of_n_accuracy"] = _acc(bon)
        report["best_of_n_items"] = len(bon)
        report["best_of_n_by_category"] = {k: {"accuracy": _acc(v), "n": len(v)} for k, v in sorted(bon_by_cat.items())}
    if n_rm:
        report["rmbench"] = _rmbench(matrices.pop("all"), n_rm.pop("all"))
        report["rmbench"]["by_domain"] = {k: _rmbench(matrices[k], n) for k, n in sorted(n_rm.items())}
    return report


def markdown_table(report: dict[str, Any]) -> str:
    rows = ["| metric | value | n |", "|---|---|---|"]

    def fmt(v: float) -> str:
        return "n/a" if v != v else f"{v:.4f}"  # NaN check

    if "pairwise_accuracy" in report:
        rows.append(f"| pairwise accuracy | {fmt(report['pairwise_accuracy'])} | {report['pairs']} |")
        if cal := report.get("calibration"):
            rows.append(f"| ECE at the version's temperature {cal['temperature']:.3g} | {fmt(cal['ece'])} | {cal['pairs']} |")
            rows.append(f"| ECE uncalibrated (temperature 1) | {fmt(cal['ece_uncalibrated'])} | {cal['pairs']} |")
        rows.append(f"| style-trap accuracy | {fmt(report['style_trap_accuracy'])} | {report['style_trap_pairs']} |")
        for k, v in report["by_category"].items():
            rows.append(f"| category: {k} | {fmt(v['accuracy'])} | {v['n']} |")
        for k, v in report["by_objectivity"].items():
            rows.append(f"| objectivity: {k} | {fmt(v['accuracy'])} | {v['n']} |")
    if "rewardbench" in report:
        rb = report["rewardbench"]
        rows.append(f"| RewardBench score | {fmt(rb['score'])} | |")
        rows.extend(f"| RewardBench {k} | {fmt(v)} | |" for k, v in rb["sections"].items())
    if "best_of_n_accuracy" in report:
        rows.append(f"| best-of-N accuracy | {fmt(report['best_of_n_accuracy'])} | {report['best_of_n_items']} |")
    if "rmbench" in report:
        for k in ("easy", "normal", "hard", "average"):
            rows.append(f"| RM-Bench {k} | {fmt(report['rmbench'][k])} | {report['rmbench']['items']} |")
    return "\n".join(rows) + "\n"


def reliability_table(calibration: dict[str, Any]) -> str:
    """The reliability diagram of a calibration report as a markdown table, one row per confidence bin."""
    rows = [f"Reliability at temperature {calibration['temperature']:.3g} (confidence = max(p, 1 - p); accuracy = "
            "share of pairs where the model picked the better response):", "",
            "| confidence bin | mean confidence | accuracy | pairs |", "|---|---|---|---|"]
    for b in calibration["reliability"]:
        conf, acc = ("-", "-") if not b["count"] else (f"{b['confidence']:.3f}", f"{b['accuracy']:.3f}")
        rows.append(f"| {b['lower']:.2f}-{b['upper']:.2f} | {conf} | {acc} | {b['count']} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------- model versions
def holdout_accuracy(rm: Any, pairs: list[dict], temperature: float = 1.0) -> dict[str, Any]:
    """Accuracy of ``rm`` on validated pairs: overall, on style traps (metadata.style_trap) and per
    generated category (metadata.gen_category); calibration at the version's ``temperature``."""
    traps = np.array([(p.get("metadata") or {}).get("style_trap") == "true" for p in pairs])
    categories = [(p.get("metadata") or {}).get("gen_category", "?") for p in pairs]
    reward_chosen, reward_rejected = rm.score_pairs(pairs)
    right = reward_chosen > reward_rejected
    by_category: dict[str, list[bool]] = defaultdict(list)
    for category, ok in zip(categories, right, strict=True):
        by_category[category].append(bool(ok))
    return {"holdout_accuracy": float(right.mean()),
            "style_trap_accuracy": float(right[traps].mean()) if traps.any() else None,
            "by_category": {c: float(np.mean(v)) for c, v in sorted(by_category.items())}, "holdout_pairs": len(pairs),
            "style_trap_pairs": int(traps.sum()),
            "calibration": calibration_report(np.asarray(reward_chosen, dtype=np.float64) - reward_rejected, temperature)}


def evaluate_versions(models_dir: str | Path, holdout: list[dict], max_length: int) -> list[dict[str, Any]]:
    """Holdout accuracy and calibration of the untrained bootstrap and of every ``current`` version in the
    store, each at its own temperature (the bootstrap's is 1)."""
    import torch

    from trainers.scoring.model import ONNX_INT8, RewardModel
    from trainers.storage.registry import BOOTSTRAP_VERSION, ModelStore

    pairs = [validate_pair(p) for p in holdout]
    torch.manual_seed(0)  # the bootstrap's random head, as the worker builds it
    out = [{"version": BOOTSTRAP_VERSION, "role": "current", "parent": None, "published_at": None} |
           holdout_accuracy(RewardModel.default(max_length=max_length), pairs)]
    store = ModelStore(models_dir)
    for info in store.list():
        if info.role != "current":
            continue  # the gold model is Stage 1's weights again (see run_seed); the report follows current
        path = store.checkout(info.version)
        backend = "onnx" if (path / ONNX_INT8).exists() else "torch"
        rm = RewardModel.load(path, backend=backend, max_length=max_length)
        out.append({"version": info.version, "role": info.role, "parent": info.manifest.get("parent"),
                    "published_at": info.manifest.get("created_at"), "backend": backend,
                    "lineage": {k: v for k, v in info.manifest.get("lineage", {}).items() if k != "shards"}}
                   | holdout_accuracy(rm, pairs, rm.temperature))
    return out
