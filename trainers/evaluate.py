"""Reward-model evaluation (`prefstream eval`): pairwise accuracy, Best-of-N, style bias, RM-Bench.

Readers turn each benchmark's file into "items" of one of three kinds:

- pair:     {"conversation", "chosen", "rejected", "category", "objectivity", "style_trap"}
- best_of_n {"conversation", "candidates": [...], "best": index}
- rmbench:  {"conversation", "chosen": [3 styles], "rejected": [3 styles]}

Accuracy is strict: a tie (equal rewards) counts as wrong.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from schemas.exceptions import InvalidRecordError
from schemas.formats import FormatError, from_hh_rlhf, from_judgebench, jsonl_objects
from schemas.pairs import validate_pair
from trainers.exceptions import DataError

EVAL_FORMATS = ("json", "hh-rlhf", "rewardbench", "rmbench", "judgebench", "best-of-n")
_MARKDOWN = re.compile(r"(^#{1,6} |\*\*|^\s*[-*] |^\s*\d+\. |```)", re.M)


def _lines(path: Path) -> Iterator[dict]:
    for line in jsonl_objects(path):
        if isinstance(line.obj, FormatError):
            raise DataError(f"{path}: {line.obj}")
        yield line.obj


def _prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def is_style_trap(chosen: str, rejected: str) -> bool:
    """RM-Bench-style trap: the rejected answer is longer and in markdown while the chosen one is plain."""
    return len(rejected) > len(chosen) and bool(_MARKDOWN.search(rejected)) and not _MARKDOWN.search(chosen)


def _pair_item(pair: dict, category: str | None = None) -> dict:
    meta = pair.get("metadata") or {}
    return {
        "kind": "pair", "conversation": pair["conversation"], "chosen": pair["chosen"], "rejected": pair["rejected"],
        "category": category or pair.get("task_category") or meta.get("category") or "all",
        "objectivity": pair.get("objectivity") or meta.get("objectivity") or "unknown",
        "style_trap": is_style_trap(pair["chosen"], pair["rejected"]),
    }


def read_ours(obj: dict) -> dict:
    return _pair_item(validate_pair({k: v for k, v in obj.items() if k not in ("margin", "split", "is_flipped", "style_trap")}))


def read_hh(obj: dict) -> dict:
    return _pair_item(validate_pair(from_hh_rlhf(obj)), "hh-rlhf")


def read_rewardbench(obj: dict) -> dict:
    pair = validate_pair({"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"]})
    return _pair_item(pair, obj.get("subset") or "rewardbench")


def read_judgebench(obj: dict) -> dict:
    return _pair_item(validate_pair(from_judgebench(obj)), obj.get("source") or "judgebench")


def read_rmbench(obj: dict) -> dict:
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) == len(rejected) == 3):
        raise DataError("an RM-Bench item needs three chosen and three rejected responses (concise, detailed, markdown)")
    return {"kind": "rmbench", "conversation": _prompt(obj["prompt"]), "chosen": chosen, "rejected": rejected,
            "category": obj.get("domain") or "rmbench"}


def read_best_of_n(obj: dict) -> dict:
    cands, best = obj["candidates"], obj["best"]
    if not isinstance(cands, list) or not 0 <= int(best) < len(cands):
        raise DataError("a best-of-n item needs 'candidates' (list) and 'best' (an index into it)")
    conv = obj.get("conversation") or _prompt(obj["prompt"])
    return {"kind": "best_of_n", "conversation": conv, "candidates": cands, "best": int(best)}


READERS: dict[str, Callable[[dict], dict]] = {
    "json": read_ours, "hh-rlhf": read_hh, "rewardbench": read_rewardbench, "rmbench": read_rmbench,
    "judgebench": read_judgebench, "best-of-n": read_best_of_n,
}


def detect_eval_format(obj: dict) -> str:
    keys = set(obj)
    if {"candidates", "best"} <= keys:
        return "best-of-n"
    if {"question", "response_A", "response_B", "label"} <= keys:
        return "judgebench"
    if {"prompt", "chosen", "rejected"} <= keys and isinstance(obj["chosen"], list):
        return "rmbench"
    if {"prompt", "chosen", "rejected", "subset"} <= keys:
        return "rewardbench"
    if keys == {"chosen", "rejected"} and "\n\nAssistant:" in str(obj["chosen"]):
        return "hh-rlhf"
    return "json"


def read_eval_items(path: str | Path, fmt: str = "auto", limit: int | None = None) -> tuple[list[dict], int]:
    """Items of a benchmark file, and how many lines were skipped as unusable (e.g. identical responses)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    items, skipped = [], 0
    for obj in _lines(path):
        f = fmt if fmt != "auto" else detect_eval_format(obj)
        if f not in READERS:
            raise DataError(f"unknown format {f!r}; use one of auto, {', '.join(EVAL_FORMATS)}")
        try:
            items.append(READERS[f](obj))
        except (InvalidRecordError, KeyError):
            skipped += 1
        if limit and len(items) >= limit:
            break
    return items, skipped


# ---------------------------------------------------------------------------- metrics
def _acc(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def evaluate(rm: Any, items: list[dict]) -> dict[str, Any]:
    """All metrics the items allow. ``rm`` needs ``score(conversations, responses)``."""
    convs, resps, owners = [], [], []
    for i, it in enumerate(items):
        responses = {"pair": [it.get("chosen"), it.get("rejected")], "best_of_n": it.get("candidates"),
                     "rmbench": (it.get("chosen") or []) + (it.get("rejected") or [])}[it["kind"]]
        for r in responses:
            convs.append(it["conversation"])
            resps.append(r)
            owners.append(i)
    scores = rm.score(convs, resps) if resps else np.zeros(0)
    per_item: dict[int, list[float]] = defaultdict(list)
    for i, s in zip(owners, scores, strict=True):
        per_item[i].append(float(s))

    pair_ok: list[bool] = []
    by_cat: dict[str, list[bool]] = defaultdict(list)
    by_obj: dict[str, list[bool]] = defaultdict(list)
    style: list[bool] = []
    bon: list[bool] = []
    matrix = np.zeros((3, 3))
    n_rm = 0
    for i, it in enumerate(items):
        s = per_item[i]
        if it["kind"] == "pair":
            ok = s[0] > s[1]
            pair_ok.append(ok)
            by_cat[it["category"]].append(ok)
            by_obj[it["objectivity"]].append(ok)
            if it["style_trap"]:
                style.append(ok)
        elif it["kind"] == "best_of_n":
            best = it["best"]
            # Ranked first means strictly above every other candidate.
            bon.append(all(s[best] > v for j, v in enumerate(s) if j != best))
        else:
            c, r = s[:3], s[3:]
            matrix += np.array([[c[a] > r[b] for b in range(3)] for a in range(3)], dtype=float)
            n_rm += 1
    report: dict[str, Any] = {"items": len(items)}
    if pair_ok:
        report["pairwise_accuracy"] = _acc(pair_ok)
        report["pairs"] = len(pair_ok)
        report["by_category"] = {k: {"accuracy": _acc(v), "n": len(v)} for k, v in sorted(by_cat.items())}
        report["by_objectivity"] = {k: {"accuracy": _acc(v), "n": len(v)} for k, v in sorted(by_obj.items())}
        report["style_trap_accuracy"] = _acc(style)
        report["style_trap_pairs"] = len(style)
    if bon:
        report["best_of_n_accuracy"] = _acc(bon)
        report["best_of_n_items"] = len(bon)
    if n_rm:
        m = matrix / n_rm
        # RM-Bench: rows = chosen style, cols = rejected style (concise, detailed, markdown).
        report["rmbench"] = {
            "easy": float(np.mean([m[a, b] for a in range(3) for b in range(3) if a > b])),
            "normal": float(np.mean(np.diag(m))),
            "hard": float(np.mean([m[a, b] for a in range(3) for b in range(3) if a < b])),
            "matrix": m.round(4).tolist(), "items": n_rm,
        }
    return report


def markdown_table(report: dict[str, Any]) -> str:
    rows = ["| metric | value | n |", "|---|---|---|"]

    def fmt(v: float) -> str:
        return "n/a" if v != v else f"{v:.4f}"  # NaN check

    if "pairwise_accuracy" in report:
        rows.append(f"| pairwise accuracy | {fmt(report['pairwise_accuracy'])} | {report['pairs']} |")
        rows.append(f"| style-trap accuracy | {fmt(report['style_trap_accuracy'])} | {report['style_trap_pairs']} |")
        for k, v in report["by_category"].items():
            rows.append(f"| category: {k} | {fmt(v['accuracy'])} | {v['n']} |")
        for k, v in report["by_objectivity"].items():
            rows.append(f"| objectivity: {k} | {fmt(v['accuracy'])} | {v['n']} |")
    if "best_of_n_accuracy" in report:
        rows.append(f"| best-of-N accuracy | {fmt(report['best_of_n_accuracy'])} | {report['best_of_n_items']} |")
    if "rmbench" in report:
        for k in ("easy", "normal", "hard"):
            rows.append(f"| RM-Bench {k} | {fmt(report['rmbench'][k])} | {report['rmbench']['items']} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------- model versions
def holdout_accuracy(rm: Any, pairs: list[dict]) -> dict[str, Any]:
    """Accuracy of ``rm`` on validated pairs: overall, on style traps (metadata.style_trap) and per
    generated category (metadata.gen_category)."""
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
            "style_trap_pairs": int(traps.sum())}


def evaluate_versions(models_dir: str | Path, holdout: list[dict], max_length: int) -> list[dict[str, Any]]:
    """Holdout accuracy of the untrained bootstrap and of every ``current`` version in the store."""
    import torch

    from trainers.model import ONNX_INT8, RewardModel
    from trainers.registry import ModelStore

    pairs = [validate_pair(p) for p in holdout]
    torch.manual_seed(0)  # the bootstrap's random head, as the worker builds it
    out = [{"version": "bootstrap", "role": "current", "parent": None, "published_at": None} |
           holdout_accuracy(RewardModel.default(max_length=max_length), pairs)]
    for info in ModelStore(models_dir).list():
        if info.role != "current":
            continue  # the gold model is Stage 1's weights again (see run_seed); the report follows current
        backend = "onnx" if (info.path / ONNX_INT8).exists() else "torch"
        rm = RewardModel.load(info.path, backend=backend, max_length=max_length)
        out.append({"version": info.version, "role": info.role, "parent": info.manifest.get("parent"),
                    "published_at": info.manifest.get("created_at"), "backend": backend,
                    "lineage": {k: v for k, v in info.manifest.get("lineage", {}).items() if k != "shards"}}
                   | holdout_accuracy(rm, pairs))
    return out
