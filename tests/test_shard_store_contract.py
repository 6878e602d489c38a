"""The ShardStore contract: the same assertions against the directory store and the bucket store (the
real embedded SeaweedFS), both opened by the one factory and driven by the one ``PartitionLog`` and
``compact_partition``: each record stored once through retries, races and crashes, compaction that
loses and duplicates nothing, and readers that see only committed records."""

from __future__ import annotations

import threading
import uuid

import pytest

from schemas.pairs import validate_pair
from trainers.storage.shards import (
    PartitionLog,
    ShardStore,
    compact_partition,
    iter_records,
    open_shard_store,
)
from trainers.storage.shards.local import LocalShardStore

TOPIC = "t.prefs.curated"


class Crash(Exception):
    pass


@pytest.fixture(params=["directory", "bucket"])
def make_store(request, tmp_path):
    """A function giving a store on one shared location, each call its own instance (and, for a bucket,
    its own mirror), as separate writer processes would have."""
    location = tmp_path / "shards" if request.param == "directory" else request.getfixturevalue("shards_url")
    made = []

    def make() -> ShardStore:
        made.append(open_shard_store(location, tmp_path / f"mirror{len(made)}"))
        return made[-1]

    return make


def ids(store: ShardStore) -> list[str]:
    return [rec["pair"]["pair_id"] for _, rec in iter_records(store.readable())]


def stored_files(store: ShardStore) -> set[str]:
    """Every shard file the store holds, named by a manifest or not."""
    if isinstance(store, LocalShardStore):
        return {str(f.relative_to(store.root)) for f in store.root.glob("*/*.avro") if f.parent.name != ".tmp"}
    return {k for k, _ in store.backend.list("") if k.endswith(".avro")}


def records(n: int, splits: tuple[str, ...] = ("gold", "silver", "silver", "silver")) -> list[dict]:
    """CuratedPairs with fresh pair ids, cycling through ``splits``."""
    tag = uuid.uuid4().hex[:6]
    return [{"pair": validate_pair({"prompt": f"{tag} question {i}?", "chosen": f"answer {i}", "rejected": "no"}),
             "split": splits[i % len(splits)], "p": 0.9, "model_version": "v1", "reason": "test", "curated_at": 0}
            for i in range(n)]


def micro_batches(log: PartitionLog, recs: list[dict], size: int, first: int = 0) -> int:
    """Commit ``recs`` in micro-batches of ``size`` as the shard writer does; returns the next offset."""
    offset = first
    for i in range(0, len(recs), size):
        rows = [(offset + j, r) for j, r in enumerate(recs[i:i + size])]
        log.append(rows, offset + len(rows))
        offset += len(rows)
    return offset


def test_appends_commit_each_record_once_and_retries_write_nothing(make_store):
    store = make_store()
    log = PartitionLog(store, TOPIC, 0, roll_records=4, roll_age_s=1e9)
    assert log.recover()["next_offset"] == 0
    recs = records(14)
    assert micro_batches(log, recs, size=3) == 14
    assert log.append([(i, r) for i, r in enumerate(recs[:6])], 6) == {}  # offsets commit failed: redelivered
    state = store.load_partition(TOPIC, 0)
    assert state["next_offset"] == 14 and all(e["count"] <= 4 for e in state["files"])
    assert sorted(ids(store)) == sorted(r["pair"]["pair_id"] for r in recs)
    offsets = sorted(rec["source_offset"] for _, rec in iter_records(store.readable()))
    assert offsets == list(range(14))
    assert store.manifest().totals() == {"gold": 4, "silver": 10}
    assert store.manifest().positions() == {f"{TOPIC}:0": 14}
    assert log.identities(lambda r: r["pair"]["pair_id"]) == {r["pair"]["pair_id"] for r in recs}
    assert stored_files(store) == {e["file"] for e in state["files"]}


def test_two_writers_racing_for_a_partition_store_each_record_once(make_store):
    recs = records(40)
    logs = [PartitionLog(make_store(), TOPIC, 1, roll_records=8, roll_age_s=1e9) for _ in range(2)]
    errors: list[BaseException] = []

    def write(log: PartitionLog, size: int) -> None:
        try:
            micro_batches(log, recs, size)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(log, size)) for log, size in zip(logs, (3, 5), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    reader = make_store()
    assert sorted(ids(reader)) == sorted(r["pair"]["pair_id"] for r in recs)
    assert reader.load_partition(TOPIC, 1)["next_offset"] == 40


def test_a_crash_between_the_write_and_the_commit_is_never_read_and_redone_once(make_store, monkeypatch):
    store = make_store()
    log = PartitionLog(store, TOPIC, 0, roll_records=6, roll_age_s=1e9)
    recs = records(10)
    nxt = micro_batches(log, recs[:4], size=4)

    def crash(*args, **kwargs):
        raise Crash("killed after the files were written, before the manifest")

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(store, "commit", crash)
        log.append([(nxt + i, r) for i, r in enumerate(recs[4:])], 10)
    assert ids(make_store()) == [r["pair"]["pair_id"] for r in recs[:4]], "a reader saw an uncommitted record"
    restarted = PartitionLog(make_store(), TOPIC, 0, roll_records=6, roll_age_s=1e9)
    assert restarted.recover()["next_offset"] == 4  # Kafka redelivers from here
    micro_batches(restarted, recs[4:], size=3, first=4)
    assert sorted(ids(make_store())) == sorted(r["pair"]["pair_id"] for r in recs)


def test_compaction_merges_small_files_and_loses_or_duplicates_nothing(make_store, monkeypatch):
    store = make_store()
    log = PartitionLog(store, TOPIC, 2, roll_records=3, roll_age_s=1e9)
    recs = records(24, splits=("silver",))
    micro_batches(log, recs, size=3)  # 8 closed files of 3
    before = store.load_partition(TOPIC, 2)
    expected = sorted(r["pair"]["pair_id"] for r in recs)

    def crash(*args, **kwargs):
        raise Crash("killed after the merged file was in place, before the manifest")

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(store, "commit", crash)
        compact_partition(store, TOPIC, 2, target_records=12, min_files=2)
    assert store.load_partition(TOPIC, 2)["files"] == before["files"] and sorted(ids(make_store())) == expected

    done = compact_partition(store, TOPIC, 2, target_records=12, min_files=2)
    assert [(c.sources, c.records) for c in done] == [(4, 12), (4, 12)]
    after = store.load_partition(TOPIC, 2)
    assert [e["count"] for e in after["files"]] == [12, 12] and after["next_offset"] == before["next_offset"]
    assert not {e["file"] for e in before["files"]} & stored_files(store), "the merged sources are removed"
    assert sorted(ids(make_store())) == expected
    assert compact_partition(store, TOPIC, 2, target_records=12, min_files=2) == []
