"""`prefstream produce`, `consume` and `shards`: getting pairs in, reading any topic, the training shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from streams.cli.common import console, progress, to_json
from streams.exceptions import StreamsError
from streams.kafka import topics
from streams.settings import get_settings


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["auto", "json", "hh-rlhf", "judgebench"]), default="auto",
              show_default=True, help="Line format; auto detects it from the first line.")
@click.option("--topic", default=None, help="Topic to write to (default: prefs.raw with the configured prefix).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Send at most this many pairs.")
@click.option("--generator-key", is_flag=True,
              help="Sign with the demo generator's key in PREFSTREAM_HOME/keys (the embedded stack's), so the "
                   "metadata.answer and metadata.tests of `prefstream generate`'s pairs count.")
def produce(file: Path, fmt: str, topic: str | None, limit: int | None, generator_key: bool) -> None:
    """Validate the pairs in a JSONL file and publish them to prefs.raw.

    FILE may be gzipped (.gz) or - for standard input. Pairs are signed with the producer key in
    PREFSTREAM_PRODUCER_KEY_ID / PREFSTREAM_PRODUCER_KEY when set (or --generator-key): without a key
    the workers ignore what the pairs vouch for themselves (metadata.answer, metadata.tests).

    Formats: our JSON ({"conversation"|"prompt", "chosen", "rejected", ...}), HH-RLHF
    ({"chosen": transcript, "rejected": transcript}) and JudgeBench (question, response_A,
    response_B, label). Lines that fail validation are reported with their reason, not sent.
    """
    from schemas.exceptions import InvalidRecordError
    from schemas.formats import FormatError, read_pair_lines
    from streams.sdk import PreferenceProducer

    key = None
    if generator_key:
        from streams.keys import generator_signer, keys_dir

        key = generator_signer(get_settings())
        if key is None:
            raise StreamsError(f"no generator key in {keys_dir(get_settings())}; start the embedded stack "
                               "(`prefstream stack up`), which generates it")
    producer = PreferenceProducer(topic=topic, key=key)
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    with progress() as bar:
        task = bar.add_task(f"producing to {producer.topic}", total=limit)
        for line in read_pair_lines(file, fmt):
            if limit is not None and producer.sent >= limit:
                break
            try:
                if isinstance(line.obj, FormatError):
                    raise line.obj
                producer.send(line.obj)
            except (InvalidRecordError, FormatError) as exc:
                reason = getattr(exc, "reason", "bad_format")
                reasons[reason] += 1
                examples.setdefault(reason, f"line {line.lineno}: {exc}")
                continue
            bar.advance(task)
        producer.flush()
    console.print(f"[green]sent {producer.sent}[/], rejected {sum(reasons.values())}")
    for reason, n in reasons.most_common():
        console.print(f"  {reason}: {n}  (e.g. {examples[reason]})", highlight=False)


@click.command()
@click.argument("topic")
@click.option("--max", "max_records", type=click.IntRange(min=1), default=None, help="Stop after this many records.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Stop after this many seconds without a new record.")
@click.option("--group", default=None,
              help="Join this consumer group and commit offsets (default: read all, commit nothing).")
@click.option("--json/--no-json", "as_json", default=True, show_default=True,
              help="Print decoded records as JSON lines; bytes fields (a dead letter's original key, value "
                   "and headers) are base64 strings. --no-json prints one summary line each.")
@click.option("--schema", default=None, help="Schema to decode with (default: the topic's schema from the topic table).")
def consume(topic: str, max_records: int | None, timeout: float, group: str | None, as_json: bool,
            schema: str | None) -> None:
    """Print the records of TOPIC from the beginning, decoded, one JSON line each.

    For example `prefstream consume prefs.scored --max 5`.

    TOPIC is the logical name (the configured prefix is added) or a full topic name. Every topic
    prints as JSON, prefs.dlq included.
    """
    from schemas.exceptions import SchemaError
    from streams.kafka.reader import TopicReader

    settings = get_settings()
    logical = topic.removeprefix(settings.topic_prefix) if settings.topic_prefix else topic
    spec = topics.BY_NAME.get(logical)
    physical = settings.topic(logical) if spec else topic
    schema = schema or (spec.value_schema if spec else "PreferencePair")
    count = bad = 0
    with TopicReader(physical, schema, settings, group=group) as reader:
        for msg in reader.messages(idle_timeout=timeout):
            try:
                record = reader.decode(msg)
            except SchemaError as exc:
                bad += 1
                console.print(f"[yellow]skipped[/] {physical}[{msg.partition()}]@{msg.offset()}: {exc}", highlight=False)
            else:
                click.echo(to_json(record.value) if as_json else f"{record.partition}@{record.offset} {record.key!r}")
                count += 1
            if max_records is not None and count >= max_records:
                break
    console.print(f"{count} record(s) from {physical}" + (f", {bad} undecodable" if bad else ""))


def _shards_root() -> Path:
    """A local directory holding the shards: PREFSTREAM_SHARDS_DIR, or a fresh mirror of PREFSTREAM_SHARDS_URL."""
    settings = get_settings()
    root = settings.shards_root()
    if not root.exists():
        raise StreamsError(f"no shards yet at {root}; the worker's shard writer creates them (PREFSTREAM_SHARDS_DIR)")
    return root


@click.group("shards", invoke_without_command=True)
@click.pass_context
def shards(ctx: click.Context) -> None:
    """The training shards (PREFSTREAM_SHARDS_DIR, or PREFSTREAM_SHARDS_URL). Alone: the committed rows per
    split and the file count.

    The shard writer appends each partition's curated pairs to one open Avro file per split and
    closes it at PREFSTREAM_WORKER_SHARD_ROLL_RECORDS records or SHARD_ROLL_AGE_S seconds; each
    partition's manifest records the committed records of every file, and readers read only those.
    With PREFSTREAM_SHARDS_URL every append is one object in the bucket, and these commands read a
    local mirror of it (PREFSTREAM_SHARDS_CACHE_DIR) brought up to date first.
    """
    if ctx.invoked_subcommand is not None:
        return
    from trainers.storage.shards import write_summary

    manifest = write_summary(_shards_root())
    click.echo(json.dumps({"totals": manifest["totals"], "files": len(manifest["shards"]),
                           "open_files": sum(1 for s in manifest["shards"] if s["open"]),
                           "positions": manifest["positions"]}, indent=1))


@shards.command("export")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True,
              help="parquet (pyarrow) or JSON lines.")
@click.option("--split", "splits", multiple=True, metavar="SPLIT",
              help="Export only this split; repeatable. The shards' splits (gold, silver, flipped, "
                   "verified_by_tool) or the derived train (what a current retrain trains on: all but the gold "
                   "holdout) and holdout (the gold holdout). Default: every split the shards hold.")
def export(out: Path, fmt: str, splits: tuple[str, ...]) -> None:
    """Write the committed shard records to OUT, one <split>.parquet or <split>.jsonl per split.

    Rows are in the conversational format of TRL's RewardTrainer: `chosen` and `rejected` are the
    conversation followed by the assistant's response, as lists of {"role", "content"} messages;
    pair_id, split, source, label_source, task_category, objectivity, controversiality, p,
    model_version, reason, created_at, curated_at, partition and offset follow. OUT/README.md maps
    the files to splits, so `datasets.load_dataset("OUT")` works, as does
    `load_dataset("parquet", data_files={"gold": "OUT/gold.parquet", ...})`. An earlier export in OUT
    is replaced; a directory holding anything else is refused.
    """
    from trainers.storage.shards.export import export_shards

    root = _shards_root()
    with progress() as bar:
        task = bar.add_task(f"exporting {root}", total=None)
        result = export_shards(root, out, fmt, list(splits) or None,
                               on_start=lambda total: bar.update(task, total=total),
                               advance=lambda n: bar.advance(task, n))
    for split, rows in result.rows.items():
        console.print(f"{split}: {rows} rows -> {out / result.files[split]}", highlight=False)


@shards.command("compact")
@click.option("--target-records", type=click.IntRange(min=2), default=None,
              help="Most records in a merged file (default: PREFSTREAM_WORKER_SHARD_ROLL_RECORDS).")
@click.option("--min-files", type=click.IntRange(min=2), default=2, show_default=True,
              help="Merge only runs of at least this many small closed files.")
def compact(target_records: int | None, min_files: int) -> None:
    """Merge runs of small closed shard files of each partition and split into larger ones.

    Safe while the workers run and at any crash: the merged file is written and fsynced, the
    partition's manifest is replaced under its lock, and only then are the small files removed.
    Open files are left alone. The writer also compacts on its own (PREFSTREAM_WORKER_SHARD_COMPACT_MIN_FILES).
    """
    from streams.settings import WorkerSettings
    from trainers.storage.shards import compact as compact_shards

    settings = get_settings()
    target = target_records or WorkerSettings().shard_roll_records
    store = settings.shard_store()
    if not store.partitions():
        raise StreamsError(f"no shards yet at {store.location}; the worker's shard writer creates them "
                           "(PREFSTREAM_SHARDS_DIR or PREFSTREAM_SHARDS_URL)")
    done = compact_shards(store, target, min_files)
    store.write_summary()
    for c in done:
        console.print(f"{c.sources} files -> {c.file} ({c.records} records)", highlight=False)
    console.print(f"compacted {sum(c.sources for c in done)} files into {len(done)}")


COMMANDS = (produce, consume, shards)
