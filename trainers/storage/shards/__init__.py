"""The training shards: Avro files of curated pairs and their per-partition manifests, in a directory
or a bucket behind one ``ShardStore`` interface (store.py), written by ``PartitionLog`` (log.py),
merged by ``compact_partition`` (compaction.py) and read through a local directory (reading.py)."""

from trainers.storage.shards.compaction import Compacted, compact, compact_partition
from trainers.storage.shards.layout import (
    MANIFEST,
    MANIFEST_DIR,
    Manifest,
    load_manifest,
    shard_schema,
    tp_key,
    write_summary,
)
from trainers.storage.shards.local import LocalShardStore, leftovers
from trainers.storage.shards.log import PartitionLog
from trainers.storage.shards.reading import iter_records
from trainers.storage.shards.store import ShardStore, open_shard_store, readable_root

__all__ = ["MANIFEST", "MANIFEST_DIR", "Compacted", "LocalShardStore", "Manifest", "PartitionLog", "ShardStore",
           "compact", "compact_partition", "iter_records", "leftovers", "load_manifest", "open_shard_store",
           "readable_root", "shard_schema", "tp_key", "write_summary"]
