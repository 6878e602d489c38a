"""Reward-model evaluation (`prefstream eval`): pairwise accuracy, Best-of-N, style bias, and the
benchmarks' own scores, read from their official file layouts.

Readers turn each benchmark's records into "items" of one of three kinds:

- pair:      {"conversation", "chosen", "rejected", "category", "objectivity", "style_trap"}
             (RewardBench items also carry "rb_subset", for its section-weighted score)
- best_of_n: {"conversation", "candidates": [...], "best": index, "category"}
- rmbench:   {"conversation", "chosen": [3 styles], "rejected": [3 styles], "category"}

Layouts read (JSONL, or a JSON array as RM-Bench and RMB ship their files):

- RewardBench (allenai/reward-bench, split "filtered"): {"prompt", "chosen", "rejected", "subset", ...}
- RM-Bench (total_dataset.json): {"prompt", "chosen": [3], "rejected": [3], "domain"}; styles in the
  order concise, detailed, detailed markdown
- RMB Best-of-N: {"bon_uid", "conversation_input", "bon_best": {"answer"}, "loser_list": [{"answer"}],
  "category_path"}; RMB pairwise: {"pair_uid", "conversation_input", "chosen": {"answer"}, "reject": {"answer"}}
- JudgeBench: {"question", "response_A", "response_B", "label": "A>B" | "B>A", "source"}

Accuracy is strict: a tie (equal rewards) counts as wrong.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from schemas.exceptions import InvalidRecordError
from schemas.formats import FormatError, from_hh_rlhf, from_judgebench, jsonl_objects, open_text
from schemas.pairs import validate_pair
from trainers.exceptions import DataError

EVAL_FORMATS = ("json", "hh-rlhf", "rewardbench", "rmbench", "judgebench", "best-of-n", "rmb-bon", "rmb-pairwise")
_MARKDOWN = re.compile(r"(^#{1,6} |\*\*|^\s*[-*] |^\s*\d+\. |```)", re.M)
_TRAINING_KEYS = ("margin", "split", "is_flipped", "style_trap", "extra")

# RewardBench's section weights, from allenai/reward-bench rewardbench/constants.py (EXAMPLE_COUNTS and
# SUBSET_MAPPING, read at commit a32e272): a section's score is its subsets' accuracies weighted by
# these counts, and the reported score is the mean of the four sections. The counts are fixed, not
# the file's: math-prm is counted 984 (447 real) so that math weighs as much as the six hep-* code
# subsets together. The two xstest counts are as that file has them.
REWARDBENCH_WEIGHTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 250, "xstest-should-respond": 154,
    "donotanswer": 136,
    "math-prm": 984, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
# JudgeBench reports four categories; its `source` names the origin (mmlu-pro-<subject>, livebench-*, livecodebench).
_JUDGEBENCH_CATEGORIES = (("mmlu-pro", "knowledge"), ("livebench-reasoning", "reasoning"),
                          ("livebench-math", "math"), ("livecodebench", "coding"))


def _records(path: Path) -> Iterator[dict]:
    """Objects of a JSONL file, or of a JSON array file (RM-Bench's and RMB's files are arrays)."""
    if path.suffix == ".parquet":
        raise DataError(f"{path} is Parquet; convert it to JSONL first, e.g. "
                        "datasets.load_dataset('parquet', data_files=PATH)['train'].to_json('out.jsonl')")
    with open_text(path) as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            with open_text(path) as fh:
                rows = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); give a JSON array or JSONL") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: element {i} is a {type(row).__name__}; each element must be a JSON object")
            yield row
        return
    for line in jsonl_objects(path):
        if isinstance(line.obj, FormatError):
            raise DataError(f"{path}: {line.obj}")
        yield line.obj


def _prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _turns(turns: list[dict]) -> list[dict]:
    """RMB's conversation_input turns carry extra keys (language, ...): keep role and content."""
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def is_style_trap(chosen: str, rejected: str) -> bool:
    """RM-Bench-style trap: the rejected answer is longer and in markdown while the chosen one is plain."""
    return len(rejected) > len(chosen) and bool(_MARKDOWN.search(rejected)) and not _MARKDOWN.search(chosen)


def _pair_item(pair: dict, category: str | None = None) -> dict:
    meta = pair.get("metadata") or {}
    category = category or pair.get("task_category") or meta.get("category") or "all"
    return {
        "kind": "pair", "conversation": pair["conversation"], "chosen": pair["chosen"], "rejected": pair["rejected"],
        "category": category, "objectivity": pair.get("objectivity") or meta.get("objectivity") or "unknown",
        "style_trap": is_style_trap(pair["chosen"], pair["rejected"]),
        # The validated pair, for regression sets; a benchmark's own category becomes its task category.
        "pair": pair if pair.get("task_category") or category == "all" else pair | {"task_category": category},
    }


def read_ours(obj: dict) -> dict:
    return _pair_item(validate_pair({k: v for k, v in obj.items() if k not in _TRAINING_KEYS}))


def read_hh(obj: dict) -> dict:
    return _pair_item(validate_pair(from_hh_rlhf(obj)), "hh-rlhf")


def read_rewardbench(obj: dict) -> dict:
    pair = validate_pair({"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"],
                          "source": "rewardbench"})
    subset = obj.get("subset") or "rewardbench"
    return _pair_item(pair, subset) | {"rb_subset": subset}


def read_judgebench(obj: dict) -> dict:
    source = obj.get("source") or "judgebench"
    category = next((name for prefix, name in _JUDGEBENCH_CATEGORIES if source.startswith(prefix)), source)
    return _pair_item(validate_pair(from_judgebench(obj)), category)


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
    return {"kind": "best_of_n", "conversation": conv, "candidates": cands, "best": int(best),
            "category": obj.get("category") or "best-of-n"}


def read_rmb_bon(obj: dict) -> dict:
    losers = obj["loser_list"]
    if not isinstance(losers, list) or not losers:
        raise DataError(f"RMB item {obj.get('bon_uid')!r}: 'loser_list' must be a non-empty list of {{'answer': ...}}")
    return {"kind": "best_of_n", "conversation": _turns(obj["conversation_input"]), "best": 0,
            "candidates": [obj["bon_best"]["answer"]] + [x["answer"] for x in losers],
            "category": obj.get("category_path") or "rmb"}


def read_rmb_pairwise(obj: dict) -> dict:
    pair = validate_pair({"conversation": _turns(obj["conversation_input"]), "chosen": obj["chosen"]["answer"],
                          "rejected": obj["reject"]["answer"], "source": "rmb"})
    return _pair_item(pair, obj.get("category_path") or "rmb")


READERS: dict[str, Callable[[dict], dict]] = {
    "json": read_ours, "hh-rlhf": read_hh, "rewardbench": read_rewardbench, "rmbench": read_rmbench,
    "judgebench": read_judgebench, "best-of-n": read_best_of_n, "rmb-bon": read_rmb_bon,
    "rmb-pairwise": read_rmb_pairwise,
}


def detect_eval_format(obj: dict) -> str:
    keys = set(obj)
    if {"conversation_input", "bon_best", "loser_list"} <= keys:
        return "rmb-bon"
    if {"conversation_input", "chosen", "reject"} <= keys:
        return "rmb-pairwise"
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
    """Items of a benchmark file, and how many records were skipped as unusable (e.g. identical responses)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    items, skipped = [], 0
    for obj in _records(path):
        f = fmt if fmt != "auto" else detect_eval_format(obj)
        if f not in READERS:
            raise DataError(f"unknown format {f!r}; use one of auto, {', '.join(EVAL_FORMATS)}")
        try:
            items.append(READERS[f](obj))
        except (InvalidRecordError, KeyError, TypeError):
            skipped += 1
        if limit and len(items) >= limit:
            break
    return items, skipped


def read_regression_pairs(path: str | Path) -> list[dict]:
    """Validated pairs of a regression set in any layout `prefstream eval` reads, for the retrain gate.

    Pair layouts give their pairs (category: the benchmark's subset/domain/source, so the gate's
    per-category check sees them); an RM-Bench record gives its nine chosen-vs-rejected style
    comparisons and a Best-of-N record the best response against each loser, the comparisons
    those benchmarks score. A comparison of two identical responses is left out; a file with
    no usable pair is an error naming the file.
    """
    items, skipped = read_eval_items(path)
    pairs: list[dict] = []
    for it in items:
        if it["kind"] == "pair":
            pairs.append(it["pair"])
            continue
        if it["kind"] == "rmbench":
            comparisons = [(c, r) for c in it["chosen"] for r in it["rejected"]]
        else:
            best = it["candidates"][it["best"]]
            comparisons = [(best, x) for j, x in enumerate(it["candidates"]) if j != it["best"]]
        for chosen, rejected in comparisons:
            try:
                pairs.append(validate_pair({"conversation": it["conversation"], "chosen": chosen, "rejected": rejected,
                                            "task_category": it["category"]}))
            except InvalidRecordError:
                skipped += 1
    if not pairs:
        raise DataError(f"regression file {path} holds no usable pair ({skipped} records skipped); "
                        f"give pairs in one of the layouts of `prefstream eval` ({', '.join(EVAL_FORMATS)})")
    if skipped:
        print(f"regression file {path}: skipped {skipped} unusable records or comparisons", file=sys.stderr)
    return pairs


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
