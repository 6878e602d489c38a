"""The shard store: rolling files, commits that survive a crash, compaction, lazy reading, export.

The offline tests drive ``PartitionLog.append``, the function the shard writer commits every
micro-batch with; the integration tests run the real ``ShardWriter`` against the embedded broker.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

import trainers.storage.shards.layout as shards
from streams.runtime.shard_writer import ShardWriter
from streams.settings import WorkerSettings
from tests.helpers import (
    SHARD_TOPIC,
    micro_batches,
    run_cli,
    run_shard_writer_until,
    shard_row,
    unique_pairs,
    write_batch,
)
from trainers.retrain import RetrainConfig
from trainers.storage.registry import ModelStore
from trainers.storage.shards import PartitionLog, compact_partition, iter_records, leftovers, load_manifest
from trainers.storage.shards.reading import read_file
from trainers.training.selection import collect, in_gold_holdout, in_gold_validation


class Clock:
    """A wall clock the test moves: file ages without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def said(proc) -> str:
    """What a command told its user (rich writes to stderr and wraps long lines)."""
    return proc.stderr.replace("\n", "")


def ids(root: Path, splits=None) -> list[str]:
    return [rec["pair"]["pair_id"] for _, rec in iter_records(root, splits=splits)]


def test_files_roll_at_the_record_threshold_across_micro_batches(tmp_path):
    log = PartitionLog(tmp_path, SHARD_TOPIC, 0, roll_records=10, roll_age_s=1e9)
    pairs = unique_pairs(34)
    micro_batches(log, [shard_row(p, "silver") for p in pairs], size=3)
    files = load_manifest(tmp_path).entries()
    assert [(e["count"], e["open"]) for e in files] == [(10, False), (10, False), (10, False), (4, True)]
    for e in files:  # each file holds exactly its committed records, in offset order, each tagged with its offset
        recs = list(read_file(tmp_path, e))
        assert [r["source_offset"] for r in recs] == list(range(e["first_offset"], e["last_offset"] + 1))
        assert (tmp_path / e["file"]).stat().st_size == e["bytes"]
    assert ids(tmp_path) == [p["pair_id"] for p in pairs]
    assert load_manifest(tmp_path).positions() == {f"{SHARD_TOPIC}:0": 34}


def test_files_roll_at_the_age_threshold(tmp_path):
    clock = Clock()
    log = PartitionLog(tmp_path, SHARD_TOPIC, 0, roll_records=1000, roll_age_s=300, clock=clock)
    recs = [shard_row(p, "silver") for p in unique_pairs(9)]
    nxt = micro_batches(log, recs[:4], size=2)
    clock.now += 299
    nxt = micro_batches(log, recs[4:6], size=2, first=nxt)  # still young: same file
    assert [e["count"] for e in load_manifest(tmp_path).entries()] == [6]
    clock.now += 1
    assert log.close_aged() == 1  # no record came, the file closes on its age alone
    micro_batches(log, recs[6:], size=3, first=nxt)
    assert [(e["count"], e["open"]) for e in load_manifest(tmp_path).entries()] == [(6, False), (3, True)]
    clock.now += 300
    micro_batches(log, [shard_row(p, "silver") for p in unique_pairs(1)], size=1, first=nxt + 3)
    assert [(e["count"], e["open"]) for e in load_manifest(tmp_path).entries()] == [(6, False), (3, False), (1, True)]


def test_each_split_has_its_own_open_file(tmp_path):
    log = PartitionLog(tmp_path, SHARD_TOPIC, 2, roll_records=4, roll_age_s=1e9)
    pairs = unique_pairs(12)
    recs = [shard_row(p, "gold" if i % 3 == 0 else "silver") for i, p in enumerate(pairs)]
    micro_batches(log, recs, size=5)
    man = load_manifest(tmp_path)
    assert man.totals() == {"gold": 4, "silver": 8}
    assert {e["split"]: e["file"].split("/")[0] for e in man.entries()} == {"gold": "gold", "silver": "silver"}
    assert ids(tmp_path, ["gold"]) == [p["pair_id"] for i, p in enumerate(pairs) if i % 3 == 0]


class Crash(Exception):
    pass


def test_a_crash_after_the_append_before_the_commit_is_never_read_and_is_truncated(tmp_path, monkeypatch):
    log = PartitionLog(tmp_path, SHARD_TOPIC, 0, roll_records=8, roll_age_s=1e9)
    recs = [shard_row(p, "silver") for p in unique_pairs(12)]
    nxt = micro_batches(log, recs[:5], size=5)
    committed = load_manifest(tmp_path).entries()[0]

    def crash(root, state):
        raise Crash("killed before the manifest was replaced")

    monkeypatch.setattr(shards, "save_partition", crash)
    with pytest.raises(Crash):  # 3 more into the open file, then a new file for the rest (roll at 8)
        log.append([(nxt + i, r) for i, r in enumerate(recs[5:])], nxt + 7)
    monkeypatch.undo()
    path = tmp_path / committed["file"]
    assert path.stat().st_size > committed["bytes"], "the premise: the append reached the file"
    assert len(list(tmp_path.glob("silver/*.avro"))) == 2 and leftovers(tmp_path)
    assert ids(tmp_path) == [r["pair"]["pair_id"] for r in recs[:5]], "a reader saw an uncommitted record"

    restarted = PartitionLog(tmp_path, SHARD_TOPIC, 0, roll_records=8, roll_age_s=1e9)
    state = restarted.recover()
    assert path.stat().st_size == committed["bytes"] and not leftovers(tmp_path)
    assert state["next_offset"] == 5  # Kafka redelivers from here
    micro_batches(restarted, recs[5:], size=4, first=state["next_offset"])
    assert ids(tmp_path) == [r["pair"]["pair_id"] for r in recs]
    assert [e["count"] for e in load_manifest(tmp_path).entries()] == [8, 4]


def test_records_the_manifest_already_holds_are_not_appended_again(tmp_path):
    """The offsets commit failed after the manifest was replaced: Kafka redelivers committed records."""
    log = PartitionLog(tmp_path, SHARD_TOPIC, 0)
    recs = [shard_row(p, "silver") for p in unique_pairs(6)]
    log.append([(i, r) for i, r in enumerate(recs[:4])], 4)
    assert log.append([(i, r) for i, r in enumerate(recs)], 6) == {"silver": 2}
    assert ids(tmp_path) == [r["pair"]["pair_id"] for r in recs]


def _closed_small_files(tmp_path: Path, n_files: int, per_file: int) -> list[str]:
    log = PartitionLog(tmp_path, SHARD_TOPIC, 0, roll_records=per_file, roll_age_s=1e9)
    pairs = unique_pairs(n_files * per_file)
    micro_batches(log, [shard_row(p, "silver") for p in pairs], size=per_file)
    return [p["pair_id"] for p in pairs]


def test_compaction_merges_small_closed_files_and_readers_see_each_record_once(tmp_path):
    expected = _closed_small_files(tmp_path, 6, 3)  # 18 records in 6 closed files of 3
    before = load_manifest(tmp_path)
    old_files = [e["file"] for e in before.entries()]
    done = compact_partition(tmp_path, SHARD_TOPIC, 0, target_records=10)
    assert [(c.sources, c.records) for c in done] == [(3, 9), (3, 9)]
    after = load_manifest(tmp_path)
    assert [e["count"] for e in after.entries()] == [9, 9] and not any(e["open"] for e in after.entries())
    assert not any((tmp_path / f).exists() for f in old_files)
    assert ids(tmp_path) == expected and after.positions() == before.positions()
    # A reader that took its manifest before the compaction still reads every record once.
    assert [rec["pair"]["pair_id"] for _, rec in iter_records(tmp_path, before)] == expected
    assert compact_partition(tmp_path, SHARD_TOPIC, 0, target_records=10) == []  # nothing small enough left to merge


def test_a_crashed_compaction_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    copies, tmp_path = tmp_path / "copies", tmp_path / "shards"
    expected = _closed_small_files(tmp_path, 4, 2)
    files = [e["file"] for e in load_manifest(tmp_path).entries()]

    real_save = shards.save_partition

    def crash(root, state):
        raise Crash("killed after the merged file was renamed in, before the manifest")

    monkeypatch.setattr(shards, "save_partition", crash)
    with pytest.raises(Crash):
        compact_partition(tmp_path, SHARD_TOPIC, 0, target_records=100)
    monkeypatch.setattr(shards, "save_partition", real_save)
    assert ids(tmp_path) == expected and [e["file"] for e in load_manifest(tmp_path).entries()] == files
    assert len(leftovers(tmp_path)) == 1  # the merged copy no manifest names

    # Killed after the manifest named the merged file, before the old files were removed.
    copies.mkdir()
    for f in files:
        shutil.copy(tmp_path / f, copies / Path(f).name)
    compact_partition(tmp_path, SHARD_TOPIC, 0, target_records=100)
    for f in files:
        shutil.copy(copies / Path(f).name, tmp_path / f)
    assert ids(tmp_path) == expected and len(leftovers(tmp_path)) == len(files)
    PartitionLog(tmp_path, SHARD_TOPIC, 0).recover()  # the partition's next writer removes them
    assert not leftovers(tmp_path) and ids(tmp_path) == expected


def test_reading_is_lazy_file_by_file(tmp_path):
    expected = _closed_small_files(tmp_path, 3, 4)
    last = load_manifest(tmp_path).entries()[-1]
    os.truncate(tmp_path / last["file"], 0)  # a damaged last file
    records = iter_records(tmp_path)
    first_two_files = [next(records)[1]["pair"]["pair_id"] for _ in range(8)]
    assert first_two_files == expected[:8], "the first files read before the damaged one is opened"
    with pytest.raises(shards.DataError):
        list(records)


def test_a_retrain_reads_new_records_and_a_replay_sample_and_names_positions(tmp_path):
    root, models = tmp_path / "shards", tmp_path / "models"
    log = PartitionLog(root, SHARD_TOPIC, 0, roll_records=10, roll_age_s=1e9)
    first = [shard_row(p, "silver") for p in unique_pairs(30)]
    nxt = micro_batches(log, first, size=7)
    cfg = RetrainConfig(shards_dir=str(root), models_dir=str(models), replay_fraction=0.3)
    store = ModelStore(models)
    got = collect(cfg, store)
    pairs, lineage = got.pairs, got.lineage
    assert len(pairs) == 30 and lineage["positions"] == {f"{SHARD_TOPIC}:0": 30} and lineage["files"] == 3
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    store.publish(src, "current", lineage=lineage)

    second = [shard_row(p, "silver") for p in unique_pairs(14)]
    micro_batches(log, second, size=5, first=nxt)  # 30 + 14: fills the open file, then one more
    got = collect(cfg, store)
    pairs, lineage = got.pairs, got.lineage
    new_ids = {r["pair"]["pair_id"] for r in second}
    assert lineage["new_pairs"] == 14 and lineage["replayed_pairs"] == int(14 * 0.3 / 0.7)
    assert {p["pair_id"] for p in pairs[:14]} == new_ids
    assert {p["pair_id"] for p in pairs[14:]} <= {r["pair"]["pair_id"] for r in first}
    assert lineage["positions"] == {f"{SHARD_TOPIC}:0": 44}


def test_the_gold_holdout_and_validation_slice_are_never_trained_on(tmp_path):
    root = tmp_path / "shards"
    log = PartitionLog(root, SHARD_TOPIC, 1, roll_records=5, roll_age_s=1e9)
    gold = [shard_row(p, "gold") for p in unique_pairs(60)]
    micro_batches(log, gold, size=8)
    got = collect(RetrainConfig(role="gold", shards_dir=str(root), models_dir=str(tmp_path / "m")),
                  ModelStore(tmp_path / "m"))
    held = {r["pair"]["pair_id"] for r in gold if in_gold_holdout(r["pair"]["pair_id"])}
    validation = {r["pair"]["pair_id"] for r in gold if in_gold_validation(r["pair"]["pair_id"])}
    assert held and validation and not held & validation
    assert {p["pair_id"] for p in got.holdout} == held and {p["pair_id"] for p in got.validation} == validation
    trained = {p["pair_id"] for p in got.pairs}
    assert not (held | validation) & trained and len(trained) + len(held) + len(validation) == 60


def _export_fixture(root: Path) -> dict[str, list[str]]:
    by_split: dict[str, list[str]] = {}
    for part, (split, n) in enumerate((("gold", 40), ("silver", 25), ("flipped", 7))):
        log = PartitionLog(root, SHARD_TOPIC, part, roll_records=6, roll_age_s=1e9)
        pairs = unique_pairs(n)
        micro_batches(log, [shard_row(p, split) for p in pairs], size=4)
        by_split[split] = [p["pair_id"] for p in pairs]
    return by_split


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export_loads_with_hugging_face_datasets(tmp_path, stack_settings, fmt):
    import datasets

    settings = stack_settings.model_copy(update={"shards_dir": tmp_path / "shards"})
    by_split = _export_fixture(settings.shards_dir)
    out = tmp_path / "export"
    proc = run_cli(["shards", "export", "--format", fmt, str(out)], settings)
    assert "gold: 40 rows" in said(proc), proc.stderr
    totals = load_manifest(settings.shards_dir).totals()
    files = {s: str(out / f"{s}.{fmt}") for s in totals}
    ds = datasets.load_dataset("parquet" if fmt == "parquet" else "json", data_files=files)
    assert {s: ds[s].num_rows for s in ds} == totals
    for split, expected in by_split.items():
        assert ds[split]["pair_id"] == expected and set(ds[split]["split"]) == {split}
    row = ds["gold"][0]
    assert [m["role"] for m in row["chosen"]][-1] == "assistant" and row["chosen"][:-1] == row["rejected"][:-1]
    assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]
    # The dataset card names the splits: the directory loads on its own.
    assert {s: n for s, n in json.loads((out / "export.json").read_text())["rows"].items()} == totals
    assert set(datasets.load_dataset(str(out))) == set(totals)


def test_export_derived_splits_and_refusals(tmp_path, stack_settings):
    from trainers.storage.shards.export import export_shards

    root = tmp_path / "shards"
    by_split = _export_fixture(root)
    res = export_shards(root, tmp_path / "out", "jsonl", ["train", "holdout"])
    held = [i for i in by_split["gold"] if in_gold_holdout(i)]
    assert res.rows == {"train": 40 + 25 + 7 - len(held), "holdout": len(held)}
    lines = [json.loads(line) for line in (tmp_path / "out" / "holdout.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in lines] == held
    settings = stack_settings.model_copy(update={"shards_dir": root})
    proc = run_cli(["shards", "export", "--split", "verified_by_tool", str(tmp_path / "o2")], settings, check=False)
    assert proc.returncode == 1 and "no records for split 'verified_by_tool'" in said(proc)
    busy = tmp_path / "mine"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    proc = run_cli(["shards", "export", str(busy)], settings, check=False)
    assert proc.returncode == 1 and "not an earlier export" in said(proc)
    assert (busy / "notes.txt").read_text() == "keep me"


def test_shards_cli_summary_and_compact(tmp_path, stack_settings):
    settings = stack_settings.model_copy(update={"shards_dir": tmp_path / "shards"})
    expected = _closed_small_files(settings.shards_dir, 5, 2)
    summary = json.loads(run_cli(["shards"], settings).stdout)
    assert summary["totals"] == {"silver": 10} and summary["files"] == 5
    assert "compacted 5 files into 1" in said(run_cli(["shards", "compact", "--target-records", "100"], settings))
    assert json.loads(run_cli(["shards"], settings).stdout)["files"] == 1
    assert ids(settings.shards_dir) == expected


# ------------------------------------------------------------------------------- the real writer
def _writes_every_pair_after_one_failed_save(settings, monkeypatch, fails_when) -> Path:
    """The disk fills once, on the first manifest write ``fails_when(state)`` picks; the writer must retry
    and end with every pair in the shards."""
    pairs = unique_pairs(12)
    write_batch(settings, pairs)
    real_save, fails = shards.save_partition, []

    def flaky(root, state):
        if not fails and fails_when(state):
            fails.append(state["partition"])
            raise OSError(28, "No space left on device")
        real_save(root, state)

    monkeypatch.setattr(shards, "save_partition", flaky)
    root = Path(settings.shards_dir)
    writer = ShardWriter(settings, WorkerSettings(shard_max_age_s=0.2, shard_compact_min_files=0), threading.Event())
    run_shard_writer_until(writer, lambda: sum(load_manifest(root).totals().values()) >= 12)
    assert fails and writer.failures == 1
    assert sorted(ids(root)) == sorted(p["pair_id"] for p in pairs)
    return root


@pytest.mark.integration
def test_a_disk_that_fails_while_a_partition_is_assigned_loses_no_record(settings, monkeypatch):
    """Recovery runs in the assignment callback: an error there must not leave the partition unassigned."""
    _writes_every_pair_after_one_failed_save(settings, monkeypatch, lambda state: True)  # recovery's write comes first


@pytest.mark.integration
def test_the_writer_rolls_files_across_micro_batches(settings):
    batches = [unique_pairs(12) for _ in range(5)]
    for b in batches:
        write_batch(settings, b)
    wsettings = WorkerSettings(shard_max_records=4, shard_max_age_s=0.2, shard_roll_records=6,
                               shard_compact_min_files=0)
    root = Path(settings.shards_dir)
    run_shard_writer_until(ShardWriter(settings, wsettings, threading.Event()),
         lambda: sum(load_manifest(root).totals().values()) >= 60)
    entries = load_manifest(root).entries()
    assert sorted(ids(root)) == sorted(p["pair_id"] for b in batches for p in b)
    by_part: dict[int, list[dict]] = {}
    for e in entries:
        by_part.setdefault(e["partition"], []).append(e)
    for part_entries in by_part.values():  # closed files hold exactly 6; only the last may be open and short
        assert all(e["count"] == 6 and not e["open"] for e in part_entries[:-1])
        assert part_entries[-1]["count"] <= 6
    # Appends carry at most 4 records, so a file of 6 holds records of more than one micro-batch.
    assert any(len(v) > 1 for v in by_part.values())
    assert json.loads((root / shards.MANIFEST).read_text())["totals"] == {"silver": 60}


@pytest.mark.integration
def test_the_writer_retries_an_append_whose_commit_failed(settings, monkeypatch):
    # After the records were appended to a file: recovery's writes hold no files yet.
    root = _writes_every_pair_after_one_failed_save(settings, monkeypatch, lambda state: bool(state["files"]))
    for e in load_manifest(root).entries():
        assert (root / e["file"]).stat().st_size == e["bytes"]
