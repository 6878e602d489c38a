"""What a retrain trains on, read from the shard manifest: the role's splits, the gold holdout and
validation slice (by pair_id hash, never trained on), new pairs and a replay sample of old ones."""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from trainers.storage.registry import ModelStore
from trainers.storage.shards import iter_records, load_manifest, readable_root, tp_key
from trainers.training.data import shard_pair

CURRENT_SPLITS = ("gold", "silver", "flipped", "verified_by_tool")
GOLD_SPLITS = ("gold",)
HOLDOUT_BUCKETS = 10  # 1 in 10 gold pairs is the gate's holdout (bucket 0), 1 in 10 the validation slice (1)
VALIDATION_BUCKET = 1


class CollectConfig(Protocol):
    """The fields of a RetrainConfig (trainers/retrain.py) that collecting reads."""

    role: str
    shards_dir: str | None
    shards_cache_dir: str | None
    s3_endpoint: str | None
    replay_fraction: float
    seed: int

def _bucket(pair_id: str) -> int:
    return int(hashlib.sha256(pair_id.encode()).hexdigest(), 16) % HOLDOUT_BUCKETS


def in_gold_holdout(pair_id: str) -> bool:
    """The gate's holdout: never trained on, never used to stop training."""
    return _bucket(pair_id) == 0


def in_gold_validation(pair_id: str) -> bool:
    """The validation slice early stopping watches: never trained on, never the gate's holdout."""
    return _bucket(pair_id) == VALIDATION_BUCKET


@dataclass
class Collected:
    """What a retrain reads from the shards."""

    pairs: list[dict]  # to train on
    holdout: list[dict]  # the gate's gold holdout
    validation: list[dict]  # the gold validation slice (early stopping)
    lineage: dict[str, Any]
    old_pairs: int = 0  # pairs the serving version trained on or could have (not read unless replayed)


def _seen_test(lineage: dict[str, Any]) -> Any:
    """Whether a shard record was in the data of the version with this lineage: below its manifest
    positions, or (a lineage from before positions were kept) in one of its files."""
    positions, files = lineage.get("positions"), set(lineage.get("shards", []))
    if positions is not None:
        def by_position(entry: dict[str, Any], offset: int) -> bool:
            return offset < positions.get(tp_key(entry["topic"], entry["partition"]), 0)
        return by_position
    return lambda entry, offset: entry["file"] in files


def superseded_by_gold(pairs: list[dict[str, Any]], gold_ids: set[str]) -> list[dict[str, Any]]:
    """``pairs`` less the automatically curated ones whose pair has a gold (human) record."""
    return [p for p in pairs if (p.get("extra") or {}).get("split") == "gold" or p["pair_id"] not in gold_ids]


def collect(cfg: CollectConfig, store: ModelStore, full: bool = False) -> Collected:
    """Training pairs, gold holdout and validation slice, and lineage for the role, read from the shard manifest.
    ``full``: every pair is read and trained on (a full retrain), none is "seen".

    Records are read lazily, file by file, up to what each file has committed (an open file
    included). Files entirely below the serving version's positions are not read unless they hold
    gold pairs (the holdout) or a record drawn for replay; old records are kept as references and
    only the replay sample is read back. The lineage is the manifest's position per partition.
    """
    root = readable_root(str(cfg.shards_dir), cfg.shards_cache_dir, cfg.s3_endpoint)
    serving = store.serving(cfg.role)
    seen = _seen_test(store.get(serving).manifest.get("lineage", {}) if serving and not full else {"positions": {}})
    manifest = load_manifest(root)
    entries = manifest.entries(CURRENT_SPLITS if cfg.role == "current" else GOLD_SPLITS)
    holdout, validation, new = [], [], []
    gold_ids: set[str] = set()  # every gold file is read, whatever the lineage
    old_entry, old_index = array("q"), array("q")  # where each old record is: entry, record number in it
    for i, entry in enumerate(entries):
        if entry["split"] != "gold" and seen(entry, entry["last_offset"]):
            old_entry.extend([i] * entry["count"])
            old_index.extend(range(entry["count"]))
            continue
        for n, (_, rec) in enumerate(iter_records(root, entries=[entry])):
            pair = shard_pair(rec)
            if entry["split"] == "gold":
                gold_ids.add(pair["pair_id"])
            if entry["split"] == "gold" and in_gold_holdout(pair["pair_id"]):
                holdout.append(pair)
            elif entry["split"] == "gold" and in_gold_validation(pair["pair_id"]):
                validation.append(pair)
            elif seen(entry, rec["source_offset"]):
                old_entry.append(i)
                old_index.append(n)
            else:
                new.append(pair)
    rng = random.Random(cfg.seed)
    k = min(len(old_entry), int(len(new) * cfg.replay_fraction / max(1e-9, 1 - cfg.replay_fraction)))
    wanted: dict[int, set[int]] = defaultdict(set)
    for j in rng.sample(range(len(old_entry)), k):
        wanted[old_entry[j]].add(old_index[j])
    replay: list[dict[str, Any]] = []
    for i in sorted(wanted):
        replay.extend(shard_pair(rec) for n, (_, rec) in enumerate(iter_records(root, entries=[entries[i]]))
                      if n in wanted[i])
    # A pair the humans decided after it was curated automatically (a neighbour of a corrected error,
    # streams/runtime/expansion.py) trains on its gold label only, and never beside its gold copy in the holdout.
    new, replay = superseded_by_gold(new, gold_ids), superseded_by_gold(replay, gold_ids)
    counts: dict[str, int] = defaultdict(int)
    for r in new + replay:
        counts[(r.get("extra") or {}).get("split") or "?"] += 1
    lineage = {"positions": manifest.positions(), "files": len(entries), "new_pairs": len(new),
               "replayed_pairs": len(replay), "pairs_by_split": dict(counts), "gold_holdout_pairs": len(holdout),
               "gold_validation_pairs": len(validation)}
    return Collected(new + replay, holdout, validation, lineage, old_pairs=len(old_entry))
