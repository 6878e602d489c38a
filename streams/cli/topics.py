"""`prefstream topics list|create`: the topic table and provisioning against any Kafka."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from streams.cli.common import console
from streams.exceptions import StreamsError
from streams.kafka import topics as topic_table
from streams.settings import get_settings


@click.group("topics")
def topics() -> None:
    """The topic table (names, partitions, configs) and provisioning against any Kafka."""


@topics.command("list")
def topics_list() -> None:
    """Print the topic table from the code (the one source of names and partition counts)."""
    settings = get_settings()
    table = Table("topic", "partitions", "config", "value schema", "what")
    for spec in topic_table.TOPICS:
        table.add_row(settings.topic(spec.name), str(spec.partitions),
                      ",".join(f"{k}={v}" for k, v in spec.config.items()), spec.value_schema, spec.doc)
    Console(width=160).print(table)


@topics.command("create")
def topics_create() -> None:
    """Create every missing topic on the configured PREFSTREAM_BOOTSTRAP (idempotent)."""
    from streams.kafka.admin import ensure_topics

    states = ensure_topics(get_settings())
    for state in states:
        console.print(f"{state.name}: {state.action} ({state.partitions} partitions)")
    if any(state.action == "mismatch" for state in states):
        raise StreamsError("some topics exist with a different partition count than the table; see above")


COMMANDS = (topics,)
