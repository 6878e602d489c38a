"""`prefstream stack up|status|down`: the embedded broker (Tansu) and Redis on this machine."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from streams.cli.common import console
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
def stack_up(durable: bool) -> None:
    """Start the broker and Redis in the background and create every topic (safe to repeat).

    Pid and log files go to PREFSTREAM_HOME (default .prefstream/). Prints the bootstrap
    address and the Redis URL to use from other shells. Without --durable the broker keeps its
    data in memory: a restarted broker starts empty.
    """
    from streams.embedded.stack import Stack

    settings = get_settings()
    if durable:
        settings = settings.model_copy(update={"durable": True})
    embedded = Stack(settings)
    with console.status("starting " + ("object store, " if embedded.durable else "") + "broker and Redis..."):
        states = embedded.up()
    created = sum(state.action == "created" for state in states)
    for state in states:
        if state.action in ("more", "fewer"):
            console.print(f"[yellow]warning:[/] topic {state.name} has {state.partitions} partitions, "
                          f"PREFSTREAM_PARTITIONS asks for {state.wanted} (`prefstream topics create` says what to do)")
    console.print(f"[green]stack up[/]: {len(states)} topics ({created} created)")
    if embedded.durable:
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
    sys.exit(0 if ok else 1)


@stack.command("down")
def stack_down() -> None:
    """Stop the servers started by `stack up` (safe if they already stopped or crashed).

    A durable stack's data stays under PREFSTREAM_HOME/seaweedfs for the next `stack up`.
    """
    from streams.embedded.stack import Stack

    for name, stopped in Stack(get_settings()).down().items():
        console.print(f"{name}: {'stopped' if stopped else 'was not running'}")


COMMANDS = (stack,)
