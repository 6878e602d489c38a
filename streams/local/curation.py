"""The demo's proof that curation pays, like for like, and that the loop keeps up with batch training.

Like for like (``like_for_like``): from the base the served version's chain started from, each arm replays
every link of that chain on exactly its pair ids with its recipe and steps (trainers/evaluation/comparison.py);
only the labels differ: ``raw`` as published on prefs.raw (noise included), ``curated`` as the chain trained
on them (pairs curation dropped never enter the chain), ``truth`` the generator's truth (the ceiling; an
HH-RLHF pair's truth is its published label). Each seed runs every arm. Each arm is scored on the clean
holdout's non-trap pairs and style traps (its ``clean_holdout`` accuracy is the two together) and on a probe
for a planted bias the holdout cannot see: objective pairs whose wrong answer is stated confidently, as the
rejected side.

Loop versus batch (``loop_vs_batch``): one training from the same base on every curated pair in the shards
with the compute the chain spent (its steps run, the last link's recipe, early stopping on the same gold
validation slice), beside the served version on the clean holdout.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.local.generate import OBJECTIVE_CATEGORIES, GenerateConfig, as_clean, generate

# The demo retrains' recipe besides epochs and tokens (the controller's --freeze-layers).
RETRAIN_FREEZE_LAYERS = 3
CONFIDENT_PROBE_PAIRS = 150
HOLDOUT_PROBES = ("non_trap", "style_traps")


def confident_probe(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` objective pairs whose wrong answer is stated confidently and is the rejected side."""
    cfg = GenerateConfig(n=n, seed=seed, flip_share=0.0, style_trap_share=0.0, categories=OBJECTIVE_CATEGORIES,
                         confident_flip_share=1.0)
    return [as_clean(p) for p in generate(cfg)]


def probes(holdout: list[dict[str, Any]], confident: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    from schemas.pairs import validate_pair

    def trap(p: dict[str, Any]) -> bool:
        return (p.get("metadata") or {}).get("style_trap") == "true"

    return {"non_trap": [validate_pair(p) for p in holdout if not trap(p)],
            "style_traps": [validate_pair(p) for p in holdout if trap(p)],
            "confident_wrong": [validate_pair(p) for p in confident]}


def arms(chain: Any, published: dict[str, dict[str, Any]], stream: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """raw, curated and truth labels of the chain's pairs, by pair id."""
    from schemas.pairs import validate_pair
    from trainers.evaluation.comparison import chain_labels

    ids = chain.pair_ids()
    raw = {i: validate_pair(published[i]) for i in ids if i in published}
    truth = {i: validate_pair(as_clean(stream[i])) for i in ids if i in stream and i in raw}
    return {"raw": raw, "curated": chain_labels(chain, raw), "truth": truth}


def _with_holdout(arm: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    """Adds clean_holdout (non-trap and style traps together, weighted by their sizes) to each seed's scores."""
    n = sum(sizes.values())
    for scores in arm["per_seed"]:
        scores["clean_holdout"] = sum(scores[p] * sizes[p] for p in HOLDOUT_PROBES) / n
    from trainers.evaluation.comparison import interval95

    values = [s["clean_holdout"] for s in arm["per_seed"]]
    arm["mean"]["clean_holdout"] = sum(values) / len(values)
    arm["ci95"]["clean_holdout"] = interval95(values)
    return arm


def like_for_like(models_dir: str | Path, version: str, published: dict[str, dict[str, Any]],
                  stream: dict[str, dict[str, Any]], probe_sets: dict[str, list[dict[str, Any]]], seeds: list[int],
                  on_arm: Callable[[str, int], None] | None = None, scale: float = 1.0) -> dict[str, Any]:
    """The three arms replayed on ``version``'s chain, their scores per probe and the gains (see the module);
    ``scale`` lengthens every link's training by that factor (the study's longer length)."""
    from trainers.chain import chain_of
    from trainers.evaluation.comparison import compare, gains
    from trainers.storage.registry import ModelStore

    store = ModelStore(models_dir)
    chain = chain_of(store, version)
    labelled = arms(chain, published, stream)
    missing = len(chain.pair_ids()) - len(labelled["truth"])
    result = compare(chain, store.checkout(chain.base), labelled, probe_sets, seeds, on_arm=on_arm, scale=scale)
    sizes = {p: len(probe_sets[p]) for p in HOLDOUT_PROBES}
    for arm in result.values():
        _with_holdout(arm, sizes)
    by_probe = gains(result)
    headline = by_probe["clean_holdout"]
    return {"version": version, "base": chain.base, "seeds": seeds, "scale": scale, "pairs": len(chain.pair_ids()),
            "pairs_without_truth": missing, "pairs_curated_label_differs": sum(
                1 for i, p in labelled["curated"].items() if p["chosen"] != labelled["raw"][i]["chosen"]),
            "links": [{"version": link.version, "mode": link.mode, "pairs": len(link.pairs),
                       "planned_steps": link.planned_steps, "kept_step": link.kept_step} for link in chain.links],
            "arms": result, "by_probe": by_probe,
            "gain": headline["mean"], "gain_ci95": headline["ci95"], "ceiling_share": headline["ceiling_share"]}


def loop_vs_batch(models_dir: str | Path, shards_dir: str | Path, version: str, served_accuracy: float,
                  holdout: list[dict[str, Any]]) -> dict[str, Any]:
    """The served version beside one batch training from the same base on all curated pairs, same compute."""
    from schemas.pairs import validate_pair
    from trainers.chain import chain_of
    from trainers.evaluation.comparison import NOT_REPLAYED
    from trainers.evaluation.evaluate import holdout_accuracy
    from trainers.retrain import RetrainConfig
    from trainers.storage.registry import ModelStore
    from trainers.training.selection import collect
    from trainers.training.train import TrainConfig, train

    store = ModelStore(models_dir)
    chain = chain_of(store, version)
    data = collect(RetrainConfig(role="current", shards_dir=str(shards_dir), models_dir=str(models_dir)), store,
                   full=True)
    recipe = chain.links[-1].recipe
    keep = {k: v for k, v in recipe.items() if k not in NOT_REPLAYED and k in TrainConfig.__dataclass_fields__}
    with tempfile.TemporaryDirectory(prefix="prefstream-batch-") as tmp:
        cfg = TrainConfig(**keep, output_dir=str(Path(tmp) / "model"), base_model=str(store.checkout(chain.base)),
                          max_steps=chain.steps_run, patience=recipe.get("patience", 0) if data.validation else 0,
                          eval_every=recipe.get("eval_every", 0), seed=recipe.get("seed", 0), plot=False,
                          progress=False, device="cpu")
        trained = train(cfg, data.pairs, data.validation)
        batch = holdout_accuracy(trained.reward_model, [validate_pair(p) for p in holdout])["holdout_accuracy"]
    return {"served": served_accuracy, "batch": batch, "gap": served_accuracy - batch, "steps": chain.steps_run,
            "batch_steps_run": trained.metrics["steps"], "pairs": len(data.pairs), "base": chain.base,
            "validation_pairs": len(data.validation)}
