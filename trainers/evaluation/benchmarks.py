"""Benchmark files in their official layouts, read into evaluation "items" (`prefstream eval`,
`retrain --regression-file`).

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
from collections.abc import Callable, Iterator
from pathlib import Path

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
