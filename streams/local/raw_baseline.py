"""The demo's baseline for curation: a reward model trained on the stream as published.

Same start (Stage 1's current version), same recipe as the controller's retrains (steps per
retrain times the retrains behind the served version, tokens, frozen layers, learning rate, seed),
same pairs (those on prefs.raw sent before the served version was published), but every label as published,
noise included. Its accuracy on the clean holdout beside the curated version's is what curation
bought.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

# The demo retrains' recipe besides steps and tokens (the controller's --freeze-layers).
RETRAIN_FREEZE_LAYERS = 3


def retrains_behind(version: str, models: list[dict[str, Any]]) -> int:
    """How many retrains lie between Stage 1 (the version without a parent) and ``version``."""
    parent = {m["version"]: m.get("parent") for m in models}
    hops, v = 0, version
    while parent.get(v) is not None and hops <= len(models):
        v, hops = parent[v], hops + 1
    return hops


def raw_pairs(raw: list[dict[str, Any]], sent_at: dict[str, float], before: float | None) -> list[dict[str, Any]]:
    """The published pairs (last record per pair_id) sent before ``before`` (all when None), in stream order."""
    last: dict[str, dict[str, Any]] = {}
    for pair in raw:
        last[pair["pair_id"]] = pair
    return [p for i, p in last.items() if before is None or sent_at.get(i, float("inf")) < before]


def raw_vs_curated(raw: dict[str, Any] | None, curated: dict[str, Any]) -> dict[str, Any]:
    """The two models on the same clean holdout: accuracy overall and on its style traps, and the gain."""
    def pick(m: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if m is None else {k: m.get(k) for k in ("holdout_accuracy", "style_trap_accuracy")}

    out: dict[str, Any] = {"raw": pick(raw), "curated": pick(curated) | {"version": curated["version"]}}
    out["gain"] = None if raw is None else curated["holdout_accuracy"] - raw["holdout_accuracy"]
    traps = (curated.get("style_trap_accuracy"), raw and raw.get("style_trap_accuracy"))
    out["style_trap_gain"] = None if None in traps else traps[0] - traps[1]
    return out


def train_raw(models_dir: str | Path, pairs: list[dict[str, Any]], holdout: list[dict[str, Any]], eval_pairs: list[dict[str, Any]],
              steps: int, max_length: int) -> dict[str, Any]:
    """Train from Stage 1's current version on ``pairs`` with the retrain recipe; its holdout accuracy."""
    from schemas.pairs import validate_pair
    from trainers.evaluation.evaluate import holdout_accuracy
    from trainers.retrain import RetrainConfig
    from trainers.storage.registry import ModelStore
    from trainers.training.train import TrainConfig, train

    store = ModelStore(models_dir)
    stage1 = next(i for i in store.list() if i.role == "current")
    recipe = RetrainConfig()  # the controller's defaults for what the demo does not set
    with tempfile.TemporaryDirectory(prefix="prefstream-raw-baseline-") as tmp:
        cfg = TrainConfig(output_dir=str(Path(tmp) / "model"), base_model=str(store.checkout(stage1.version)),
                          max_steps=steps, max_length=max_length, freeze_layers=RETRAIN_FREEZE_LAYERS,
                          freeze_embeddings=recipe.freeze_embeddings, batch_size=recipe.batch_size,
                          learning_rate=recipe.learning_rate, seed=recipe.seed, eval_every=0, progress=False,
                          plot=False, device="cpu")
        trained = train(cfg, [validate_pair(p) for p in pairs], [validate_pair(p) for p in eval_pairs])
        result = holdout_accuracy(trained.reward_model, [validate_pair(p) for p in holdout])
    return {"version": "raw-trained", "base": stage1.version, "steps": steps, "train_pairs": len(pairs)} | result
