"""`prefstream stack up|status|down`: the embedded broker (Tansu) and Redis on this machine."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from streams.cli.common import BROKERS_HELP, console
from streams.settings import get_settings


@click.group()
def stack() -> None:
    """Run the embedded broker (Tansu), Redis and, when durable, an object store (SeaweedFS) on this machine."""


@stack.command("up")
@click.option("--durable", is_flag=True, help=(
    "Keep the broker's topics, records and committed offsets in an embedded S3 object store (SeaweedFS, data "
    "under PREFSTREAM_HOME/seaweedfs) instead of in memory, so they survive `stack down` and crashes. Same as "
    "PREFSTREAM_DURABLE=true. A home started durable stays durable: later `stack up`, `up` and `demo` runs "
    "on it are durable without the option (after `stack down`, deleting PREFSTREAM_HOME/broker.storage makes "
    "it in-memory again; docs/operations.md)."))
@click.option("--brokers", type=click.IntRange(1, 16), default=None, help=BROKERS_HELP)
@click.option("--engine", type=click.Choice(["tansu", "kafka"]), default=None, help=(
    "The broker: 'tansu' (default, no Java needed) or 'kafka': Apache Kafka KRaft brokers (replication factor "
    "min(3, brokers)) from jars Maven fetches once into PREFSTREAM_KAFKA_CACHE (43 MB of jars; needs Java 17+ "
    "and Maven). Same as PREFSTREAM_ENGINE. A home started on Kafka stays on it (docs/operations.md)."))
def stack_up(durable: bool, brokers: int | None, engine: str | None) -> None:
    """Start the broker(s) and Redis in the background and create every topic (safe to repeat).

    Pid and log files go to PREFSTREAM_HOME (default .prefstream/). Prints the bootstrap
    list and the Redis URL to use from other shells. Without --durable the broker keeps its
    data in memory: a restarted broker starts empty.
    """
    from streams.embedded.apache_kafka import uses_kafka
    from streams.embedded.stack import Stack, cluster_bootstrap, with_brokers

    settings = get_settings()
    if engine:
        settings = settings.model_copy(update={"engine": engine})
    if uses_kafka(settings.engine, settings.home):
        if durable:
            raise click.UsageError("--durable is for the Tansu engine: Kafka brokers keep their log on disk "
                                   "under PREFSTREAM_HOME/kafka anyway")
        if brokers:
            settings = settings.model_copy(update={"bootstrap": cluster_bootstrap(settings.bootstrap, brokers)})
    else:
        settings = with_brokers(settings, durable, brokers)
    embedded = Stack(settings)
    if embedded.kafka is not None and brokers:
        embedded.kafka.check_size(brokers)
    settings = embedded.settings
    what = "Kafka brokers" if embedded.kafka is not None else ("object store, " if embedded.durable else "") + "broker"
    with console.status(f"starting {what} and Redis..."):
        states = embedded.up()
    created = sum(state.action == "created" for state in states)
    for state in states:
        if state.action in ("more", "fewer"):
            console.print(f"[yellow]warning:[/] topic {state.name} has {state.partitions} partitions, "
                          f"PREFSTREAM_PARTITIONS asks for {state.wanted} (`prefstream topics create` says what to do)")
    console.print(f"[green]stack up[/]: {len(embedded.brokers)} broker{'s' if len(embedded.brokers) > 1 else ''}, "
                  f"{len(states)} topics ({created} created)")
    if embedded.kafka is not None:
        console.print(f"broker: Apache Kafka {settings.kafka_version}, replication factor "
                      f"{embedded.kafka.replication_factor}, logs under {embedded.kafka.dir}")
    elif embedded.durable:
        console.print(f"broker storage: {embedded.storage} in the object store at {embedded.object_store.endpoint_url} "
                      "(durable)")
    else:
        console.print(f"broker storage: {embedded.storage} (lost when the broker stops; --durable keeps it)")
    click.echo(f"PREFSTREAM_BOOTSTRAP={settings.bootstrap}")
    click.echo(f"PREFSTREAM_REDIS_URL={settings.redis_url}")


@stack.command("status")
def stack_status() -> None:
    """Show whether the broker, Redis and (durable stack) the object store run and answer; exit 1 if one does not."""
    from streams.embedded.stack import Stack

    table = Table("server", "pid", "address", "answers", "log")
    ok = True
    for server in Stack(get_settings()).status():
        ok &= server.answers
        table.add_row(server.name, str(server.pid or "-"), server.address,
                      "[green]yes[/]" if server.answers else "[red]no[/]", str(server.log))
    Console().print(table)
    _print_workers()
    sys.exit(0 if ok else 1)


def _print_workers() -> None:
    """The partitions of prefs.raw each worker of a running `prefstream up` holds, with their lag (from the
    workers' own /metrics: the broker cannot say)."""
    from pathlib import Path

    from streams.local.services import WORKER_METRICS_FILE
    from streams.local.status import assignment_text, scrape, worker_assignment

    try:
        urls = (Path(get_settings().home) / WORKER_METRICS_FILE).read_text().split()
    except OSError:
        return  # no `prefstream up` runs in this home
    table = Table("worker", "metrics", "partitions of prefs.raw (lag)")
    for i, url in enumerate(urls, start=1):
        m = scrape(url)
        table.add_row(str(i), url, "[red]does not answer[/]" if m is None else assignment_text(worker_assignment(m)))
    Console().print(table)


@stack.command("down")
def stack_down() -> None:
    """Stop the servers started by `stack up` (safe if they already stopped or crashed).

    A durable stack's data stays under PREFSTREAM_HOME/seaweedfs for the next `stack up`.
    """
    from streams.embedded.stack import Stack

    for name, stopped in Stack(get_settings()).down().items():
        console.print(f"{name}: {'stopped' if stopped else 'was not running'}")


COMMANDS = (stack,)
