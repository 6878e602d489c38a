"""Export the committed shard records as Parquet or JSONL for training outside prefstream.

One file per split, ``<split>.parquet`` or ``<split>.jsonl``, each row a pair in the conversational
format TRL's RewardTrainer and Hugging Face ``datasets`` read: ``chosen`` and ``rejected`` are the
conversation followed by the assistant's response, as lists of ``{"role", "content"}`` messages
(the prompt is implicit: the turns the two share). Metadata columns follow. A dataset card
(``README.md``) maps the files to splits, so ``datasets.load_dataset(OUT)`` names the splits, and
``export.json`` records the rows per split and the manifest positions the export read up to.

Splits are the shards' own (gold, silver, flipped, verified_by_tool) and two derived ones:
``train``, what a current-model retrain trains on (every split but the gold holdout), and
``holdout``, the gold holdout (``trainers.training.selection.in_gold_holdout``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.exceptions import DataError
from trainers.storage.shards.layout import Manifest, load_manifest
from trainers.storage.shards.reading import iter_records
from trainers.training.selection import CURRENT_SPLITS, in_gold_holdout

FORMATS = ("parquet", "jsonl")
DERIVED = ("train", "holdout")
ROW_GROUP = 1000  # rows buffered per Parquet row group: memory stays bounded on long exports
METADATA = ("pair_id", "split", "source", "label_source", "task_category", "objectivity", "controversiality", "p",
            "model_version", "reason", "created_at", "curated_at", "partition", "offset")


def to_row(rec: dict[str, Any], partition: int) -> dict[str, Any]:
    """One export row of a shard record (CuratedPair)."""
    pair = rec["pair"]
    conversation = [{"role": m["role"], "content": m["content"]} for m in pair["conversation"]]
    return {
        "chosen": conversation + [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": conversation + [{"role": "assistant", "content": pair["rejected"]}],
        "pair_id": pair["pair_id"], "split": rec["split"], "source": pair["source"],
        "label_source": pair["label_source"], "task_category": pair.get("task_category"),
        "objectivity": pair.get("objectivity"), "controversiality": pair.get("controversiality"),
        "p": rec.get("p"), "model_version": rec.get("model_version"), "reason": rec.get("reason"),
        "created_at": pair["created_at"], "curated_at": rec["curated_at"],
        "partition": partition, "offset": rec["source_offset"],
    }


def _arrow_schema() -> Any:
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    types = {"p": pa.float64(), "created_at": pa.int64(), "curated_at": pa.int64(), "partition": pa.int32(),
             "offset": pa.int64()}
    return pa.schema([("chosen", message), ("rejected", message)]
                     + [(name, types.get(name, pa.string())) for name in METADATA])


@dataclass
class ExportResult:
    out: Path
    fmt: str
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)


def _sources(split: str) -> tuple[tuple[str, ...], Callable[[dict[str, Any]], bool]]:
    """The shard splits a split reads and which of their records it keeps."""
    if split == "train":
        return CURRENT_SPLITS, lambda r: not (r["split"] == "gold" and in_gold_holdout(r["pair"]["pair_id"]))
    if split == "holdout":
        return ("gold",), lambda r: in_gold_holdout(r["pair"]["pair_id"])
    return (split,), lambda r: True


def plan(manifest: Manifest, splits: list[str] | None) -> dict[str, int]:
    """The splits to write and how many records each reads (the progress total)."""
    totals = manifest.totals()
    if not totals:
        raise DataError(f"no committed shard records under {manifest.root}: the worker's shard writer writes them "
                        "(PREFSTREAM_SHARDS_DIR)")
    chosen = list(dict.fromkeys(splits)) if splits else sorted(totals)
    out = {}
    for split in chosen:
        if not re.fullmatch(r"\w+", split):
            raise DataError(f"split {split!r} is not a plain name (letters, digits, _)")
        reads = sum(totals.get(s, 0) for s in _sources(split)[0])
        if not reads:
            have = ", ".join(f"{k} ({v})" for k, v in sorted(totals.items()))
            raise DataError(f"the shards hold no records for split {split!r}; they hold {have}, and the derived "
                            f"splits {', '.join(DERIVED)}")
        out[split] = reads
    return out


def _rows(root: Path, manifest: Manifest, split: str, advance: Callable[[int], None]) -> Iterator[dict[str, Any]]:
    shard_splits, keep = _sources(split)
    for entry, rec in iter_records(root, manifest, shard_splits):
        advance(1)
        if keep(rec):
            yield to_row(rec, entry["partition"])


def _write_parquet(path: Path, rows: Iterator[dict[str, Any]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, n, batch = _arrow_schema(), 0, []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            batch.append(row)
            if len(batch) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n, batch = n + len(batch), []
        if batch or not n:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    return n


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _card(files: dict[str, str], fmt: str) -> str:
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, name in files.items():
        lines += [f"  - split: {split}", f"    path: {name}"]
    lines += ["---", "", "Preference pairs exported by `prefstream shards export` in the conversational format of "
              "TRL's RewardTrainer: `chosen` and `rejected` are the conversation followed by the assistant's "
              f"response. One {fmt} file per split; `export.json` gives the rows per split and the shard "
              "manifest positions the export read up to.", ""]
    return "\n".join(lines)


def export_shards(root: Path, out: Path, fmt: str = "parquet", splits: list[str] | None = None,
                  on_start: Callable[[int], None] | None = None,
                  advance: Callable[[int], None] | None = None) -> ExportResult:
    """Write one ``fmt`` file per split under ``out`` from the committed records of the shards at
    ``root`` (one manifest snapshot). ``on_start(total)`` and ``advance(n)`` report progress in
    records read. Each file is written under a temporary name and renamed when complete."""
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    root, out = Path(root), Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give a directory for the export (one file per split goes in it)")
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").exists():
        raise DataError(f"{out} holds files that are not an earlier export; give a new or empty directory")
    manifest = load_manifest(root)
    todo = plan(manifest, splits)
    if on_start:
        on_start(sum(todo.values()))
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out, fmt, positions=manifest.positions())
    write = _write_parquet if fmt == "parquet" else _write_jsonl
    for split in todo:
        name = f"{split}.{fmt}"
        tmp = out / f".{name}.tmp"
        result.rows[split] = write(tmp, _rows(root, manifest, split, advance or (lambda n: None)))
        os.replace(tmp, out / name)
        result.files[split] = name
    (out / "README.md").write_text(_card(result.files, fmt))
    (out / "export.json").write_text(json.dumps({"format": fmt, "rows": result.rows, "files": result.files,
                                                 "positions": result.positions, "shards": str(root)}, indent=1))
    return result
