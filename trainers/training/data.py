"""Reading preference pairs for training: JSONL (ours or HH-RLHF) and Avro shard files of CuratedPair.

A shards root (or one split directory in it) is read through its manifest (``trainers.storage.shards``):
only committed records, file by file. Records of the splits that rank neither response (tie,
both_bad: ``schemas.records.UNRANKED_SPLITS``) are not preference pairs and are left out.

A shard record's strength (how much better chosen is, as the human majority said) becomes the pair's
Bradley-Terry margin through ``STRENGTH_MARGIN``: the loss is ``-log sigmoid(r_c - r_r - margin)``, so
a "much" pair is pushed until its reward gap exceeds 1.0, a "slightly" one only until it is positive.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from fastavro import reader as avro_reader

from schemas.exceptions import InvalidRecordError
from schemas.formats import READERS, FormatError, detect, jsonl_objects
from schemas.pairs import validate_pair
from schemas.records import UNRANKED_SPLITS
from trainers.exceptions import DataError
from trainers.storage.shards import MANIFEST, MANIFEST_DIR, iter_records

TRAINING_KEYS = ("margin", "split", "is_flipped", "style_trap")
# A CuratedPair's strength -> the margin its training pair carries; a record without one trains at 0.
STRENGTH_MARGIN = {"slightly": 0.0, "clearly": 0.5, "much": 1.0}  # keyed by schemas.records.STRENGTHS


def read_training_pairs(path: Path, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Pairs from JSONL: our pair JSON, HH-RLHF or JudgeBench. Training-only keys go to 'extra'.

    A line that parses but is not a usable pair (identical responses, a missing field) is skipped with
    its reason appended to ``skipped``, so the caller can say how many were left out and why.
    """
    for line in jsonl_objects(path):
        obj = line.obj
        if isinstance(obj, FormatError):
            raise DataError(f"{path}: {obj}")
        # 'extra' is what read_pairs itself attaches, so its own output reads back.
        extra = obj.pop("extra", None) if isinstance(obj.get("extra"), dict) else {}
        extra |= {k: obj.pop(k) for k in list(obj) if k in TRAINING_KEYS}
        try:
            pair = validate_pair(READERS[detect(obj)](obj))
        except InvalidRecordError as exc:
            if skipped is not None:
                skipped.append(f"{path}:{line.lineno}: {exc}")
            continue
        pair["extra"] = extra
        yield pair


def shard_pair(rec: dict[str, Any]) -> dict[str, Any]:
    """The training pair of a CuratedPair shard record; its split, and the margin of its strength when it
    has one (``STRENGTH_MARGIN``), go to 'extra'."""
    pair = dict(rec["pair"])
    pair["extra"] = {"split": rec.get("split")}
    strength = rec.get("strength")
    if strength is not None:
        if strength not in STRENGTH_MARGIN:
            raise DataError(f"shard record {pair.get('pair_id')} has strength {strength!r}; a strength is one of "
                            f"{', '.join(STRENGTH_MARGIN)} (rewrite the record or drop its strength)")
        pair["extra"]["margin"] = STRENGTH_MARGIN[strength]
    return pair


def ranked(rec: dict[str, Any]) -> bool:
    """Whether a shard record is a preference (chosen better than rejected) and so a training pair."""
    return rec.get("split") not in UNRANKED_SPLITS


def read_shard(path: Path) -> Iterator[dict[str, Any]]:
    """Pairs from one Avro container file of CuratedPair, the whole file (a file handed over on its
    own; the committed part of a live shards root is read with ``read_shards``)."""
    try:
        with path.open("rb") as fh:
            # A shard file holds CuratedPair records, which fastavro reads as dicts.
            for rec in cast(Iterable[dict[str, Any]], avro_reader(fh)):
                if ranked(rec):
                    yield shard_pair(rec)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read shard {path}: {exc}") from exc


def is_shards_root(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_DIR).is_dir() or (path / MANIFEST).is_file())


def read_shards(root: Path, splits: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The committed pairs of a shards root, lazily, in manifest order. A pair curated automatically and later
    decided by humans (a neighbour of a corrected error) is read once, with its gold label."""
    gold = ({rec["pair"]["pair_id"] for _, rec in iter_records(root, splits=["gold"])}
            if splits is None or "gold" in splits else set())
    for _, rec in iter_records(root, splits=splits):
        if rec.get("split") != "gold" and rec["pair"]["pair_id"] in gold:
            continue
        if ranked(rec):
            yield shard_pair(rec)


def read_pairs(paths: Sequence[str | Path], skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every pair in the given files or directories (*.avro, *.jsonl, *.jsonl.gz).

    Unusable JSONL lines are skipped and listed in ``skipped``; when nothing usable is left the error
    names the first reason instead of saying the files were empty.
    """
    skipped = [] if skipped is None else skipped
    out: list[dict[str, Any]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path} does not exist")
        if is_shards_root(path):
            out.extend(read_shards(path))
            continue
        if is_shards_root(path.parent) and path.is_dir():  # one split of a shards root
            out.extend(read_shards(path.parent, [path.name]))
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".avro":
                out.extend(read_shard(f))
            elif f.name.endswith((".jsonl", ".jsonl.gz", ".json")):
                out.extend(read_training_pairs(f, skipped))
    if not out:
        why = f"; all {len(skipped)} records were unusable, the first: {skipped[0]}" if skipped else ""
        raise DataError(f"no pairs found in {', '.join(map(str, paths))} (expected *.avro shards or *.jsonl){why}")
    return out


def split_holdout(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/holdout split."""
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    n_hold = int(len(pairs) * fraction)
    hold = set(idx[:n_hold])
    return [pairs[i] for i in idx if i not in hold], [pairs[i] for i in sorted(hold)]
