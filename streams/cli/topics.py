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
        table.add_row(settings.topic(spec.name), str(spec.partitions_in(settings)),
                      ",".join(f"{k}={v}" for k, v in spec.config.items()), spec.value_schema, spec.doc)
    Console(width=160).print(table)


@topics.command("create")
@click.option("--grow", is_flag=True, help="Add partitions to data topics that have fewer than PREFSTREAM_PARTITIONS. "
                                           "Keys then map to other partitions: order per key holds for new records only.")
def topics_create(grow: bool) -> None:
    """Create every missing topic on the configured PREFSTREAM_BOOTSTRAP (idempotent).

    Data topics get PREFSTREAM_PARTITIONS partitions (the most workers that share the load). A topic
    with more partitions than that is refused: Kafka cannot remove partitions.
    """
    from streams.kafka.admin import ensure_topics

    states = ensure_topics(get_settings(), grow=grow)
    for state in states:
        console.print(f"{state.name}: {state.action} ({state.partitions} partitions)")
    more = [s for s in states if s.action == "more"]
    if more:
        raise StreamsError(f"{more[0].name} has {more[0].partitions} partitions and PREFSTREAM_PARTITIONS asks for "
                           f"{more[0].wanted}; Kafka cannot remove partitions: set PREFSTREAM_PARTITIONS to "
                           f"{max(s.partitions for s in more)} or more")
    fewer = [s for s in states if s.action == "fewer"]
    if fewer:
        raise StreamsError(f"{fewer[0].name} has {fewer[0].partitions} partitions, PREFSTREAM_PARTITIONS asks for "
                           f"{fewer[0].wanted}: run `prefstream topics create --grow` to add them")


COMMANDS = (topics,)
