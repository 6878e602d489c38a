"""Retrains that learn: early stopping on a validation slice, replayable chains, full retrains from the base."""

from __future__ import annotations

import json

import pytest

from tests.helpers import FAST_RETRAIN, swapped, toy_pairs, write_shard
from trainers.chain import chain_of, read_training_pairs, response_digest
from trainers.retrain import RetrainConfig, run_retrain, run_seed
from trainers.storage.registry import ModelStore
from trainers.training.selection import in_gold_holdout, in_gold_validation
from trainers.training.train import TrainConfig, held_out_scores, train


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(tmp_path / "model"), max_length=64, batch_size=8, learning_rate=1e-4,
                       plot=False, progress=False, device="cpu", **kw)


def test_early_stopping_stops_and_keeps_the_best_weights(tmp_path):
    # Held-out labels opposite to the training labels: every step that learns makes held-out accuracy
    # worse, so the best evaluation is an early one and patience runs out long before the schedule ends.
    pairs = toy_pairs(64)
    result = train(_cfg(tmp_path, max_steps=40, eval_every=2, patience=2), pairs, swapped(toy_pairs(24, seed=5)))
    m = result.metrics
    assert m["stopped_early"] and m["steps"] < m["planned_steps"] == 40
    evals = [h for h in result.history if "eval_accuracy" in h]
    best = max(evals, key=lambda h: (h["eval_accuracy"], -h["eval_loss"]))
    assert m["best_step"] == best["step"] < m["steps"]
    # The weights kept are the best evaluation's, not the last step's.
    acc, loss = held_out_scores(result.reward_model, swapped(toy_pairs(24, seed=5)))
    assert acc == best["eval_accuracy"] and abs(loss - best["eval_loss"]) < 1e-3


def test_stop_after_runs_part_of_a_schedule_with_its_learning_rates(tmp_path):
    full = train(_cfg(tmp_path / "a", max_steps=12, eval_every=0), toy_pairs(48), [])
    part = train(_cfg(tmp_path / "b", max_steps=12, eval_every=0, stop_after=5), toy_pairs(48), [])
    assert part.metrics["steps"] == 5 and part.metrics["planned_steps"] == 12
    assert [h["lr"] for h in part.history] == [h["lr"] for h in full.history[:5]]


def _gold_pairs(n: int, seed: int) -> list[dict]:
    return [p | {"pair_id": f"g{seed}-{i}"} for i, p in enumerate(toy_pairs(n, seed=seed))]


def test_retrains_size_to_data_stop_early_and_every_nth_trains_in_full_from_the_base(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "extra"}) for p in toy_pairs(40)))
    models, shards = tmp_path / "models", tmp_path / "shards"
    base = RetrainConfig(seed_file=str(seed), models_dir=str(models), shards_dir=str(shards),
                         **(FAST_RETRAIN | {"max_steps": 6}))
    run_seed(base, None)
    store = ModelStore(models)
    stage1 = store.serving("current")

    # 300 gold pairs: a tenth is the holdout, a tenth the validation slice early stopping watches.
    gold = _gold_pairs(300, seed=1)
    write_shard(shards, "gold", gold)
    cfg = RetrainConfig(models_dir=str(models), shards_dir=str(shards), full_retrain_every=2, tolerance=1,
                        **(FAST_RETRAIN | {"max_steps": 0, "epochs": 1.0}))
    first = run_retrain(cfg)
    assert first.decision == "published", first.reason
    lineage = store.get(first.version).manifest["lineage"]
    assert lineage["mode"] == "incremental" and lineage["since_full"] == 1 and lineage["base_version"] == stage1
    validation = [p for p in gold if in_gold_validation(p["pair_id"])]
    assert lineage["early_stopping"] == f"on {len(validation)} gold validation pairs"
    trained = [p for p in gold if not in_gold_holdout(p["pair_id"]) and not in_gold_validation(p["pair_id"])]
    # Sized to the data: one epoch of the job's pairs at batch 8, unless it stopped early.
    assert lineage["planned_steps"] == -(-len(trained) // 8) and lineage["steps"] <= lineage["planned_steps"]
    recorded = read_training_pairs(store.checkout(first.version))
    assert {r["pair_id"] for r in recorded} == {p["pair_id"] for p in trained}
    assert {r["chosen"] for r in recorded} == {response_digest(p["chosen"]) for p in trained}

    write_shard(shards, "silver", _gold_pairs(60, seed=2))
    second = run_retrain(cfg)
    assert second.decision == "published", second.reason
    lineage = store.get(second.version).manifest["lineage"]
    # The second retrain is full: from Stage 1, on every curated pair (the first retrain's too), not a replay sample.
    assert lineage["mode"] == "full" and lineage["base_version"] == stage1 and lineage["since_full"] == 0
    assert lineage["replayed_pairs"] == 0 and lineage["new_pairs"] == len(trained) + 60
    assert store.get(second.version).manifest["parent"] == first.version

    chain = chain_of(store, second.version)
    assert chain.base == stage1 and [link.mode for link in chain.links] == ["full"]
    chain = chain_of(store, first.version)
    assert chain.base == stage1 and [link.version for link in chain.links] == [first.version]
    assert chain.links[0].steps == lineage_steps(store, first.version)


def lineage_steps(store: ModelStore, version: str) -> int:
    return store.get(version).manifest["lineage"]["steps"]


def test_like_for_like_replays_a_chain_with_each_arms_labels_paired_by_seed(tmp_path):
    from trainers.chain import Chain, Link
    from trainers.evaluation.comparison import chain_labels, compare, gains, oriented

    pairs = {f"t{i}": p | {"pair_id": f"t{i}"} for i, p in enumerate(toy_pairs(32))}
    # The chain trained on these pairs, every one with its right answer chosen; stored as published (swapped).
    link = Link("v1", "incremental", [{"pair_id": i, "chosen": response_digest(p["chosen"])} for i, p in pairs.items()],
                planned_steps=8, steps=8, kept_step=6, recipe={"batch_size": 8, "max_length": 64, "learning_rate": 1e-4})
    chain = Chain("base", [link])
    published = {i: p | {"chosen": p["rejected"], "rejected": p["chosen"]} for i, p in pairs.items()}
    assert oriented(published["t0"], response_digest("elsewhere")) is None
    curated = chain_labels(chain, published)
    assert {i: p["chosen"] for i, p in curated.items()} == {i: p["chosen"] for i, p in pairs.items()}

    probe = {"toy": toy_pairs(16, seed=9)}
    arms = compare(chain, "default", {"raw": published, "curated": curated, "truth": dict(pairs)}, probe, seeds=[0, 1])
    assert [len(arms[a]["per_seed"]) for a in arms] == [2, 2, 2]
    # Trained to prefer the wrong side, the raw arm ranks the probe's pairs backwards; curated and truth do not.
    assert arms["raw"]["mean"]["toy"] < 0.5 < arms["curated"]["mean"]["toy"]
    got = gains(arms)["toy"]
    assert got["mean"] > 0.3 and len(got["per_seed"]) == 2 and got["ci95"][0] <= got["mean"] <= got["ci95"][1]
    assert got["ceiling_share"] == pytest.approx(1.0, abs=0.05)  # curated labels are the truth here


def test_a_chain_without_a_retrain_is_refused_with_what_to_do():
    from trainers.chain import Chain
    from trainers.evaluation.comparison import compare
    from trainers.exceptions import TrainerError

    with pytest.raises(TrainerError, match="trained by no retrain.*longer time limit"):
        compare(Chain("current-stage1", []), "default", {"raw": {}}, {"toy": toy_pairs(4)}, seeds=[0])
