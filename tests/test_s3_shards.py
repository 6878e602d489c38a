"""Training shards in object storage (PREFSTREAM_SHARDS_URL) against the real embedded SeaweedFS:
appends as immutable objects named by a CAS-updated manifest, racing writers, compaction, the
mirror that readers use, and the real shard writer on the real broker."""

from __future__ import annotations

import threading

import pytest

from streams.runtime.shard_writer import ShardWriter
from streams.settings import WorkerSettings
from tests.helpers import (
    SHARD_TOPIC,
    micro_batches,
    run_shard_writer_until,
    shard_row,
    unique_pairs,
    write_batch,
)
from trainers.exceptions import DataError
from trainers.retrain import RetrainConfig
from trainers.storage.registry import ModelStore
from trainers.storage.shards import PartitionLog, compact_partition, iter_records, load_manifest
from trainers.storage.shards.s3 import S3ShardStore
from trainers.training.selection import collect


def store_of(url: str, mirror=None) -> S3ShardStore:
    return S3ShardStore.from_url(url, mirror)


def mirrored_ids(store: S3ShardStore, root) -> list[str]:
    return [rec["pair"]["pair_id"] for _, rec in iter_records(store.mirror(root))]


def test_appends_are_objects_named_by_the_manifest_and_read_back_through_the_mirror(shards_url, tmp_path):
    store = store_of(shards_url, tmp_path / "mirror")
    log = PartitionLog(store, SHARD_TOPIC, 0)
    assert log.recover()["next_offset"] == 0
    recs = [shard_row(p, "silver" if i % 3 else "gold") for i, p in enumerate(unique_pairs(20))]
    assert micro_batches(log, recs, size=6) == 20
    state = store.load_partition(SHARD_TOPIC, 0)
    assert state["next_offset"] == 20 and sum(e["count"] for e in state["files"]) == 20
    assert all(not e["open"] and e["sha256"] for e in state["files"])
    # One object per split per append, each exactly the bytes its entry names.
    objects = {k for k, _ in store.backend.list("") if not k.startswith("manifest/")}
    assert objects == {e["file"] for e in state["files"]}
    assert sorted(mirrored_ids(store, tmp_path / "reader")) == sorted(r["pair"]["pair_id"] for r in recs)
    assert store.manifest().totals() == {"gold": 7, "silver": 13}
    assert log.identities(lambda r: r["pair"]["pair_id"]) == {r["pair"]["pair_id"] for r in recs}
    # A retried append (its offset commit failed) writes nothing again.
    assert log.append([(i, r) for i, r in enumerate(recs[:6])], 6) == {}
    assert len(store.load_partition(SHARD_TOPIC, 0)["files"]) == len(state["files"])


def test_two_writers_racing_for_one_partition_write_each_record_once(shards_url, tmp_path):
    """During a rebalance two writers may append the same records: the manifest's CAS on next_offset
    lets one win and the other append only what is missing."""
    store = store_of(shards_url)
    recs = [shard_row(p, "silver") for p in unique_pairs(60)]
    logs = [PartitionLog(store_of(shards_url, tmp_path / f"m{i}"), SHARD_TOPIC, 3) for i in range(2)]
    errors: list[BaseException] = []

    def write(log: PartitionLog, size: int) -> None:
        try:
            micro_batches(log, recs, size)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(log, size)) for log, size in zip(logs, (5, 7), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    got = mirrored_ids(store, tmp_path / "reader")
    assert sorted(got) == sorted(r["pair"]["pair_id"] for r in recs), "every record exactly once"
    offsets = [rec["source_offset"] for _, rec in iter_records(tmp_path / "reader")]
    assert sorted(offsets) == list(range(60))


def test_compaction_merges_objects_deletes_the_sources_and_sweeps_leftovers(shards_url, tmp_path):
    store = store_of(shards_url, tmp_path / "mirror")
    log = PartitionLog(store, SHARD_TOPIC, 1)
    recs = [shard_row(p, "silver") for p in unique_pairs(24)]
    micro_batches(log, recs, size=3)  # 8 objects of 3
    store.backend.put(f"silver/{SHARD_TOPIC}.p1.000000000900-000000000901.c.avro", b"left by a crash")
    done = compact_partition(store, SHARD_TOPIC, 1, target_records=12, min_files=2)
    assert [(c.sources, c.records) for c in done] == [(4, 12), (4, 12)]
    state = store.load_partition(SHARD_TOPIC, 1)
    objects = {k for k, _ in store.backend.list("silver/")}
    assert objects == {e["file"] for e in state["files"]} | {f"silver/{SHARD_TOPIC}.p1.000000000900-000000000901.c.avro"}
    assert sorted(mirrored_ids(store, tmp_path / "reader")) == sorted(r["pair"]["pair_id"] for r in recs)
    # An unnamed object is removed only once it is old: a live append names its objects within seconds.
    assert store.sweep(state, older_than_s=0) == [f"silver/{SHARD_TOPIC}.p1.000000000900-000000000901.c.avro"]
    # A reader's mirror refuses an object whose bytes are not those its manifest entry names.
    reader = tmp_path / "reader"
    entry = state["files"][0]
    store.backend.put(entry["file"], b"changed outside prefstream")
    (reader / entry["file"]).unlink()
    with pytest.raises(DataError, match="sha256"):
        store.mirror(reader)


def test_a_retrain_reads_the_bucket_through_its_mirror(shards_url, tmp_path):
    store = store_of(shards_url, tmp_path / "mirror")
    log = PartitionLog(store, SHARD_TOPIC, 0)
    micro_batches(log, [shard_row(p, "silver") for p in unique_pairs(30)], size=7)
    cfg = RetrainConfig(shards_dir=shards_url, shards_cache_dir=str(tmp_path / "cache"),
                        models_dir=str(tmp_path / "models"))
    got = collect(cfg, ModelStore(tmp_path / "models"))
    pairs, lineage = got.pairs, got.lineage
    assert len(pairs) == 30 and lineage["positions"] == {f"{SHARD_TOPIC}:0": 30}
    assert load_manifest(tmp_path / "cache").totals() == {"silver": 30}


@pytest.mark.integration
def test_the_shard_writer_uploads_every_pair_once_and_resumes_after_a_restart(settings, shards_url, tmp_path):
    s = settings.model_copy(update={"shards_url": shards_url, "shards_cache_dir": tmp_path / "writer-mirror"})
    wsettings = WorkerSettings(shard_max_records=4, shard_max_age_s=0.2, shard_compact_min_files=2,
                               shard_roll_records=16)
    store = store_of(shards_url)

    def total() -> int:
        return sum(store.manifest().totals().values())

    first = unique_pairs(12)
    write_batch(s, first)
    run_shard_writer_until(ShardWriter(s, wsettings, threading.Event()), lambda: total() >= 12)
    second = unique_pairs(12)
    write_batch(s, second)
    write_batch(s, second[:4], transactional_id="test-worker-redo")  # a batch redone: second copies
    writer = ShardWriter(s, wsettings, threading.Event())  # a restart: resumes from the manifests
    run_shard_writer_until(writer, lambda: total() >= 24)
    got = mirrored_ids(store, tmp_path / "reader")
    assert sorted(got) == sorted(p["pair_id"] for p in first + second)
    assert writer.compacted > 0, "runs of small objects were merged"
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").rglob("*.avro")), \
        "nothing is written to PREFSTREAM_SHARDS_DIR when the shards are in a bucket"
