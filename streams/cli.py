"""The `prefstream` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.exceptions import SchemaError
from streams import topics
from streams.exceptions import StreamsError
from streams.settings import get_settings

console = Console(stderr=True)


class _Group(click.Group):
    """Turns our own errors into one red line and exit code 1, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (StreamsError, SchemaError) as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            sys.exit(1)
        except _trainer_errors() as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(1)


def _trainer_errors() -> tuple[type[BaseException], ...]:
    try:
        from trainers.exceptions import TrainerError
    except ImportError:
        return ()
    return (TrainerError,)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="prefstream")
def main() -> None:
    """prefstream: a streaming data engine that keeps a reward model learning from live preference data.

    Settings come from PREFSTREAM_* environment variables (PREFSTREAM_BOOTSTRAP,
    PREFSTREAM_REDIS_URL, PREFSTREAM_HOME, PREFSTREAM_TOPIC_PREFIX, SCHEMA_REGISTRY_URL, ...);
    the defaults run everything on this machine. Start with `prefstream stack up`.
    """


# --------------------------------------------------------------------------- stack
@main.group()
def stack() -> None:
    """Run the embedded broker (Tansu) and Redis on this machine."""


@stack.command("up")
def stack_up() -> None:
    """Start the broker and Redis in the background and create every topic (safe to repeat).

    Pid and log files go to PREFSTREAM_HOME (default .prefstream/). Prints the bootstrap
    address and the Redis URL to use from other shells.
    """
    from streams.embedded.stack import Stack

    settings = get_settings()
    st = Stack(settings)
    with console.status("starting broker and Redis..."):
        states = st.up()
    created = sum(s.action == "created" for s in states)
    for s in states:
        if s.action == "mismatch":
            console.print(f"[yellow]warning:[/] topic {s.name} has {s.partitions} partitions, the table says "
                          f"{topics.BY_NAME.get(s.name.removeprefix(settings.topic_prefix)).partitions}")
    console.print(f"[green]stack up[/]: {len(states)} topics ({created} created)")
    click.echo(f"PREFSTREAM_BOOTSTRAP={settings.bootstrap}")
    click.echo(f"PREFSTREAM_REDIS_URL={settings.redis_url}")


@stack.command("status")
def stack_status() -> None:
    """Show whether the broker and Redis run and answer; exit 1 if either does not."""
    from streams.embedded.stack import Stack

    table = Table("server", "pid", "address", "answers", "log")
    ok = True
    for s in Stack(get_settings()).status():
        ok &= s.answers
        table.add_row(s.name, str(s.pid or "-"), s.address, "[green]yes[/]" if s.answers else "[red]no[/]", str(s.log))
    Console().print(table)
    sys.exit(0 if ok else 1)


@stack.command("down")
def stack_down() -> None:
    """Stop the broker and Redis started by `stack up` (safe if they already stopped or crashed)."""
    from streams.embedded.stack import Stack

    for name, stopped in Stack(get_settings()).down().items():
        console.print(f"{name}: {'stopped' if stopped else 'was not running'}")


@main.group("topics")
def topics_group() -> None:
    """The topic table (names, partitions, configs) and provisioning against any Kafka."""


@topics_group.command("list")
def topics_list() -> None:
    """Print the topic table from the code (the one source of names and partition counts)."""
    settings = get_settings()
    table = Table("topic", "partitions", "config", "value schema", "what")
    for t in topics.TOPICS:
        table.add_row(settings.topic(t.name), str(t.partitions), ",".join(f"{k}={v}" for k, v in t.config.items()),
                      t.value_schema, t.doc)
    Console(width=160).print(table)


@topics_group.command("create")
def topics_create() -> None:
    """Create every missing topic on the configured PREFSTREAM_BOOTSTRAP (idempotent)."""
    from streams.admin import ensure_topics

    states = ensure_topics(get_settings())
    for s in states:
        console.print(f"{s.name}: {s.action} ({s.partitions} partitions)")
    if any(s.action == "mismatch" for s in states):
        raise StreamsError("some topics exist with a different partition count than the table; see above")


# --------------------------------------------------------------------------- produce / consume
def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["auto", "json", "hh-rlhf", "judgebench"]), default="auto",
              show_default=True, help="Line format; auto detects it from the first line.")
@click.option("--topic", default=None, help="Topic to write to (default: prefs.raw with the configured prefix).")
@click.option("--limit", type=int, default=None, help="Send at most this many pairs.")
def produce(file: Path, fmt: str, topic: str | None, limit: int | None) -> None:
    """Validate the pairs in a JSONL file and publish them to prefs.raw.

    FILE may be gzipped (.gz) or - for standard input.

    Formats: our JSON ({"conversation"|"prompt", "chosen", "rejected", ...}), HH-RLHF
    ({"chosen": transcript, "rejected": transcript}) and JudgeBench (question, response_A,
    response_B, label). Lines that fail validation are reported with their reason, not sent.
    """
    from collections import Counter

    from schemas.exceptions import InvalidRecordError
    from streams.exceptions import InputFormatError
    from streams.formats import read_pairs
    from streams.sdk import PreferenceProducer

    producer = PreferenceProducer(topic=topic)
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    with _progress() as progress:
        task = progress.add_task(f"producing to {producer.topic}", total=limit)
        for lineno, item in read_pairs(file, fmt):
            if limit is not None and producer.sent >= limit:
                break
            try:
                if isinstance(item, InputFormatError):
                    raise item
                producer.send(item)
            except (InvalidRecordError, InputFormatError) as exc:
                reason = getattr(exc, "reason", "bad_format")
                reasons[reason] += 1
                examples.setdefault(reason, f"line {lineno}: {exc}")
                continue
            progress.advance(task)
        producer.flush()
    console.print(f"[green]sent {producer.sent}[/], rejected {sum(reasons.values())}")
    for reason, n in reasons.most_common():
        console.print(f"  {reason}: {n}  (e.g. {examples[reason]})", highlight=False)


@main.command()
@click.argument("topic")
@click.option("--max", "max_records", type=int, default=None, help="Stop after this many records.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Stop after this many seconds without a new record.")
@click.option("--group", default=None, help="Join this consumer group and commit offsets (default: read all, commit nothing).")
@click.option("--json/--no-json", "as_json", default=True, show_default=True,
              help="Print decoded records as JSON lines (--no-json prints one summary line each).")
@click.option("--schema", default=None, help="Schema to decode with (default: the topic's schema from the topic table).")
def consume(topic: str, max_records: int | None, timeout: float, group: str | None, as_json: bool, schema: str | None) -> None:
    """Print the records of TOPIC from the beginning, decoded, one JSON line each.

    For example `prefstream consume prefs.scored --max 5`.

    TOPIC is the logical name (the configured prefix is added) or a full topic name.
    """
    from schemas.exceptions import SchemaError as _SchemaError
    from streams.sdk import TopicReader

    settings = get_settings()
    logical = topic.removeprefix(settings.topic_prefix) if settings.topic_prefix else topic
    spec = topics.BY_NAME.get(logical)
    physical = settings.topic(logical) if spec else topic
    schema = schema or (spec.value_schema if spec else "PreferencePair")
    count = bad = 0
    with TopicReader(physical, schema, settings, group=group) as reader:
        for msg in reader.messages(idle_timeout=timeout):
            try:
                record = reader.codec.decode(schema, msg.value(), msg.headers(), physical)
            except _SchemaError as exc:
                bad += 1
                console.print(f"[yellow]skipped[/] {physical}[{msg.partition()}]@{msg.offset()}: {exc}", highlight=False)
            else:
                line = json.dumps(record, ensure_ascii=False) if as_json else f"{msg.partition()}@{msg.offset()} {msg.key()!r}"
                click.echo(line)
                count += 1
            if max_records is not None and count >= max_records:
                break
    console.print(f"{count} record(s) from {physical}" + (f", {bad} undecodable" if bad else ""))


def _register_optional_commands() -> None:
    """Commands that live in other modules (kept out of start-up time of `prefstream --help`)."""
    from streams import cli_demo, cli_models, cli_stream

    cli_demo.register(main)
    cli_models.register(main)
    cli_stream.register(main)


_register_optional_commands()


if __name__ == "__main__":
    main()
