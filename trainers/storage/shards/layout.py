"""The shards' layout, record schema and manifests, as they lie in a local directory.

Layout under a shards directory (the directory store's root, or the mirror of a bucket)::

    <split>/<topic>.p<partition>.<first offset>.avro          a file the shard writer appends to (then closed)
    <split>/<topic>.p<partition>.<first>-<last>.c.avro        a file compaction merged from closed ones
    <split>/<topic>.p<partition>.<first>-<last>.<id>.c.avro   an object of a bucket (one append, or a merge)
    manifest/<topic>.p<partition>.json                         the partition's manifest (what readers trust)
    manifest.json                                               a summary of every partition's manifest

A partition's manifest lists its files per split in offset order, each with the committed record
count and byte length, whether it is still open for appends, and ``next_offset``: the prefs.curated
offset after the last committed record. Every record carries ``source_offset``, its offset on
prefs.curated, so a retrain's lineage is a position per partition (``next_offset``) instead of a list
of files, and stays true when compaction replaces files.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from fastavro import parse_schema
from fastavro import writer as avro_writer

from schemas import registry
from trainers.exceptions import DataError
from trainers.storage.files import atomic_write

MANIFEST = "manifest.json"
MANIFEST_DIR = "manifest"
TMP_DIR = ".tmp"
CODEC = "deflate"
MANIFEST_NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.json$")
# Records per file at which the writer rolls a file, and the size compaction merges up to, unless told.
DEFAULT_ROLL_RECORDS = 10_000

# Changes a partition's manifest in place; raises ManifestMoved (store.py) when it is no longer the one
# planned against.
Change = Callable[[dict[str, Any]], None]


@lru_cache(maxsize=1)
def shard_schema() -> dict[str, Any]:
    """CuratedPair (expanded, so a file's header reads without our named-type table) plus the record's
    prefs.curated offset, which makes lineage positions survive compaction."""
    schema = json.loads(registry.get("CuratedPair").expanded_json)
    schema["fields"].append({"name": "source_offset", "type": "long", "default": -1,
                             "doc": "Offset of the record on prefs.curated; its partition is in the file name."})
    # A record schema parses to a dict (fastavro types the result as any schema form).
    return cast(dict[str, Any], parse_schema(schema))


def encode(rows: list[tuple[int, dict[str, Any]]]) -> bytes:
    """One Avro file of ``rows`` ((offset, CuratedPair)), each record stamped with its offset."""
    buf = io.BytesIO()
    avro_writer(buf, shard_schema(), [rec | {"source_offset": offset} for offset, rec in rows], codec=CODEC)
    return buf.getvalue()


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def empty_partition(topic: str, partition: int) -> dict[str, Any]:
    return {"topic": topic, "partition": partition, "next_offset": 0, "files": []}


def manifest_key(topic: str, partition: int) -> str:
    """A partition's manifest, relative to the shards root (or the bucket prefix)."""
    return f"{MANIFEST_DIR}/{topic}.p{partition}.json"


def manifest_path(root: Path, topic: str, partition: int) -> Path:
    return Path(root) / manifest_key(topic, partition)


def load_partition(root: Path, topic: str, partition: int) -> dict[str, Any]:
    path = manifest_path(root, topic, partition)
    if not path.exists():
        return empty_partition(topic, partition)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the shard manifest {path}: {exc}; it is replaced atomically, so this is "
                        "damage from outside: restore it from a backup") from exc


def save_partition(root: Path, state: dict[str, Any]) -> None:
    state["updated_at"] = time.time()
    path = manifest_path(root, state["topic"], state["partition"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(state, indent=1).encode())


def partitions(root: Path) -> list[tuple[str, int]]:
    """The (topic, partition) of every manifest in a shards directory."""
    out = []
    for path in (Path(root) / MANIFEST_DIR).glob("*.json"):
        m = MANIFEST_NAME.match(path.name)
        if m:
            out.append((m["topic"], int(m["part"])))
    return sorted(out)


@dataclass
class Manifest:
    """Every partition's manifest at one moment (each read atomically)."""

    root: Path
    partitions: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def entries(self, splits: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """File entries (with their topic and partition), by partition, split and offset."""
        wanted = set(splits) if splits is not None else None
        out = []
        for (topic, part), state in sorted(self.partitions.items()):
            for e in sorted(state["files"], key=lambda e: (e["split"], e["first_offset"])):
                if wanted is None or e["split"] in wanted:
                    out.append(e | {"topic": topic, "partition": part})
        return out

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self.entries():
            out[e["split"]] += e["count"]
        return dict(out)

    def positions(self) -> dict[str, int]:
        """Per partition, the offset after the last committed record: what a reader of this manifest saw."""
        return {tp_key(*tp): s["next_offset"] for tp, s in sorted(self.partitions.items())}


def load_manifest(root: Path) -> Manifest:
    """Every partition's manifest in a shards directory."""
    man = Manifest(Path(root))
    for topic, part in partitions(root):
        man.partitions[(topic, part)] = load_partition(root, topic, part)
    return man


def write_summary(root: Path) -> dict[str, Any]:
    """Rewrite ``manifest.json`` (totals per split, every file with its committed count) from the
    partitions' manifests in a shards directory, and return it."""
    man = load_manifest(root)
    summary = {"updated_at": time.time(), "totals": man.totals(), "positions": man.positions(),
               "shards": man.entries()}
    Path(root).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(root) / MANIFEST, json.dumps(summary, indent=1).encode())
    return summary
