"""Like-for-like comparisons of training labels: replay a version's chain with other labels.

One thing changes between the arms: the labels. Each arm starts from the chain's base, trains every link on
exactly that link's pair ids with the link's recipe and schedule, and stops where the link's published weights
were taken (trainers/chain.py); the arms differ only in which response of each pair is the chosen one (and
its margin). Each seed is run for every arm (paired by seed), so the gain of one arm over another is measured
seed by seed. Every arm is evaluated on the same named probe sets.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trainers.chain import Chain, response_digest
from trainers.exceptions import TrainerError

# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 seeds); 1.96 beyond the table.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}
# What the replayed runs may not take over from a link's recipe: where they read and write, and how they stop.
NOT_REPLAYED = ("train_files", "eval_files", "output_dir", "base_model", "resume_from", "checkpoint_every",
                "max_steps", "stop_after", "patience", "eval_every", "seed", "plot", "progress", "device", "threads")


def interval95(values: list[float]) -> list[float] | None:
    """Mean +- t * standard error over seeds; None for fewer than two values."""
    if len(values) < 2:
        return None
    df = len(values) - 1
    t = T95.get(df) or next((T95[k] for k in sorted(T95, reverse=True) if k <= df), 1.96)
    mean, se = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return [mean - t * se, mean + t * se]


def oriented(pair: dict[str, Any], chosen_digest: str) -> dict[str, Any] | None:
    """``pair`` with the response whose digest is ``chosen_digest`` as chosen; None when neither matches."""
    if response_digest(pair["chosen"]) == chosen_digest:
        return pair
    if response_digest(pair["rejected"]) == chosen_digest:
        return pair | {"chosen": pair["rejected"], "rejected": pair["chosen"]}
    return None


def chain_labels(chain: Chain, pairs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pairs labelled as the chain trained on them (its curated labels and margins), by pair id."""
    out: dict[str, dict[str, Any]] = {}
    for link in chain.links:
        for rec in link.pairs:
            pair = pairs.get(rec["pair_id"])
            got = oriented(pair, rec["chosen"]) if pair is not None else None
            if got is not None:
                out[rec["pair_id"]] = got | {"extra": {"margin": rec.get("margin", 0.0)}}
    return out


def replay(chain: Chain, base_dir: str | Path, labels: dict[str, dict[str, Any]], seed: int, work: Path,
           device: str = "cpu", scale: float = 1.0) -> Any:
    """Train from ``base_dir`` through every link of ``chain`` with ``labels``; the last RewardModel.
    ``scale`` multiplies every link's schedule and steps (a longer training of the same chain)."""
    from trainers.training.train import TrainConfig, train

    if not chain.links:
        raise TrainerError(f"the served version is {chain.base} itself, trained by no retrain: there is no chain to "
                           "replay (a demo whose first retrain did not serve before its time limit leaves this; give "
                           "it a longer time limit)")
    model_dir, rm = str(base_dir), None
    for i, link in enumerate(chain.links):
        pairs = [labels[r["pair_id"]] for r in link.pairs if r["pair_id"] in labels]
        if not pairs:
            raise TrainerError(f"no labelled pair for link {link.version} of the chain: the arm cannot replay it")
        recipe = {k: v for k, v in link.recipe.items() if k not in NOT_REPLAYED and k in TrainConfig.__dataclass_fields__}
        cfg = TrainConfig(**recipe, output_dir=str(work / f"link-{i}"), base_model=model_dir,
                          max_steps=max(1, round(link.planned_steps * scale)),
                          stop_after=max(1, round(link.kept_step * scale)), patience=0, eval_every=0,
                          seed=seed, plot=False, progress=False, device=device)
        result = train(cfg, pairs, [])
        model_dir, rm = str(result.output_dir), result.reward_model
    return rm


def compare(chain: Chain, base_dir: str | Path, arms: dict[str, dict[str, dict[str, Any]]],
            probes: dict[str, list[dict[str, Any]]], seeds: list[int], device: str = "cpu",
            on_arm: Callable[[str, int], None] | None = None, scale: float = 1.0) -> dict[str, Any]:
    """Every arm replayed on every seed and scored on every probe: {arm: {"per_seed": [{probe: acc}], ...}}."""
    from trainers.training.train import held_out_scores

    out: dict[str, Any] = {}
    for name, labels in arms.items():
        per_seed = []
        for seed in seeds:
            if on_arm:
                on_arm(name, seed)
            with tempfile.TemporaryDirectory(prefix=f"prefstream-arm-{name}-") as tmp:
                rm = replay(chain, base_dir, labels, seed, Path(tmp), device, scale)
                per_seed.append({probe: held_out_scores(rm, pairs)[0] for probe, pairs in probes.items() if pairs})
        out[name] = {"per_seed": per_seed, "mean": {p: float(np.mean([s[p] for s in per_seed])) for p in per_seed[0]},
                     "ci95": {p: interval95([s[p] for s in per_seed]) for p in per_seed[0]}}
    return out


def gains(arms: dict[str, Any], better: str = "curated", worse: str = "raw", ceiling: str = "truth") -> dict[str, Any]:
    """Per probe: the paired gain of ``better`` over ``worse`` (mean, per seed, 95% interval) and the share of
    the ceiling it recovers, (better - worse) / (ceiling - worse), from the means (None when the ceiling is
    not above the worse arm)."""
    out: dict[str, Any] = {}
    for probe in arms[better]["mean"]:
        diffs = [b[probe] - w[probe] for b, w in zip(arms[better]["per_seed"], arms[worse]["per_seed"], strict=True)]
        room = arms[ceiling]["mean"][probe] - arms[worse]["mean"][probe] if ceiling in arms else None
        out[probe] = {"mean": float(np.mean(diffs)), "per_seed": diffs, "ci95": interval95(diffs),
                      "ceiling_share": (float(np.mean(diffs)) / room) if room and room > 0 else None}
    return out
