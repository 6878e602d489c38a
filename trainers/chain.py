"""A role's chain of versions: what each retrain trained on, from which base, for how many steps.

Every retrain writes the pairs it trained on into its model directory (``TRAINING_PAIRS``: each pair's id and
a digest of the response it was trained to prefer) and records in its lineage how it trained (``mode``:
seed, incremental or full; the base version; the steps planned, run and kept). From the serving version
back to the base, these links are what a like-for-like comparison replays with other labels
(trainers/evaluation/comparison.py) and what a batch run on all curated pairs is measured against.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.formats import read_objects
from trainers.exceptions import TrainerError

TRAINING_PAIRS = "training-pairs.jsonl.gz"
MODES = ("seed", "incremental", "full")


def response_digest(text: str) -> str:
    """A short digest of a response: tells which side a link was trained to prefer without storing text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_training_pairs(model_dir: str | Path, pairs: list[dict[str, Any]]) -> None:
    """Record (pair_id, digest of the chosen response, margin when set) of every training pair in the model
    directory."""
    with gzip.open(Path(model_dir) / TRAINING_PAIRS, "wt", encoding="utf-8") as fh:
        for p in pairs:
            margin = float((p.get("extra") or {}).get("margin") or 0.0)
            fh.write(json.dumps({"pair_id": p["pair_id"], "chosen": response_digest(p["chosen"])}
                                | ({"margin": margin} if margin else {})) + "\n")


def read_training_pairs(model_dir: str | Path) -> list[dict[str, str]]:
    path = Path(model_dir) / TRAINING_PAIRS
    if not path.exists():
        raise TrainerError(f"{model_dir} has no {TRAINING_PAIRS}: it was not published by a retrain that records "
                           "its pairs, so its chain cannot be replayed")
    return read_objects(path)


@dataclass
class Link:
    """One retrain of a chain: warm-started from the previous link (or the base), trained on ``pairs``."""

    version: str
    mode: str
    pairs: list[dict[str, str]]  # pair_id and the digest of the response it was trained to prefer
    planned_steps: int  # the learning-rate schedule's length
    steps: int  # steps run (fewer than planned when it stopped early)
    kept_step: int  # the step whose weights were published (the best evaluation, or the last step)
    recipe: dict[str, Any] = field(default_factory=dict)  # the TrainConfig it ran with


@dataclass
class Chain:
    base: str  # the version the first link started from (the role's Stage 1 version)
    links: list[Link]

    @property
    def steps_run(self) -> int:
        return sum(link.steps for link in self.links)

    def pair_ids(self) -> set[str]:
        return {p["pair_id"] for link in self.links for p in link.pairs}


def root_version(store: Any, version: str) -> str:
    """The first version of ``version``'s line (no parent): the role's Stage 1 version."""
    seen, v = set(), version
    while True:
        parent = store.get(v).manifest.get("parent")
        if parent is None or parent in seen:
            return v
        seen.add(v)
        v = parent


def chain_of(store: Any, version: str) -> Chain:
    """The links that made ``version``, from its base: back to the last full retrain (which itself started
    from the base) or to the first retrain after Stage 1."""
    links: list[Link] = []
    v = version
    while True:
        info = store.get(v)
        lineage = info.manifest.get("lineage", {})
        mode = lineage.get("mode")
        if info.manifest.get("parent") is None or mode == "seed":
            base = v
            break
        if mode not in ("incremental", "full"):
            raise TrainerError(f"version {v} has no retrain lineage (mode {mode!r}); its chain cannot be replayed")
        metrics = json.loads((store.checkout(v) / "metrics.json").read_text())
        links.append(Link(v, mode, read_training_pairs(store.checkout(v)), int(metrics.get("planned_steps") or metrics["steps"]),
                          int(metrics["steps"]), int(metrics.get("best_step") or metrics["steps"]),
                          metrics.get("config") or {}))
        if mode == "full":
            base = lineage["base_version"]
            break
        v = info.manifest["parent"]
    return Chain(base, links[::-1])
