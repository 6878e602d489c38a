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
def produce(file: Path, fmt: str, topic: str | None, limit: int | None) -> None:
    """Validate the pairs in a JSONL file and publish them to prefs.raw.

    FILE may be gzipped (.gz) or - for standard input.

    Formats: our JSON ({"conversation"|"prompt", "chosen", "rejected", ...}), HH-RLHF
    ({"chosen": transcript, "rejected": transcript}) and JudgeBench (question, response_A,
    response_B, label). Lines that fail validation are reported with their reason, not sent.
    """
    from schemas.exceptions import InvalidRecordError
    from schemas.formats import FormatError, read_jsonl
    from streams.sdk import PreferenceProducer

    producer = PreferenceProducer(topic=topic)
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    with progress() as bar:
        task = bar.add_task(f"producing to {producer.topic}", total=limit)
        for line in read_jsonl(file, fmt):
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


@click.command("shards")
def shards() -> None:
    """Show the shard manifest: rows per split and the shard files."""
    from streams.runtime.shard_writer import write_manifest

    root = Path(get_settings().shards_dir)
    if not root.exists():
        raise StreamsError(f"no shards yet at {root}; the worker's shard writer creates them (PREFSTREAM_SHARDS_DIR)")
    manifest = write_manifest(root)
    click.echo(json.dumps({"totals": manifest["totals"], "files": len(manifest["shards"])}, indent=1))


COMMANDS = (produce, consume, shards)
