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
    """Run the embedded broker (Tansu) and Redis on this machine."""


@stack.command("up")
def stack_up() -> None:
    """Start the broker and Redis in the background and create every topic (safe to repeat).

    Pid and log files go to PREFSTREAM_HOME (default .prefstream/). Prints the bootstrap
    address and the Redis URL to use from other shells.
    """
    from streams.embedded.stack import Stack

    settings = get_settings()
    with console.status("starting broker and Redis..."):
        states = Stack(settings).up()
    created = sum(state.action == "created" for state in states)
    for state in states:
        if state.action in ("more", "fewer"):
            console.print(f"[yellow]warning:[/] topic {state.name} has {state.partitions} partitions, "
                          f"PREFSTREAM_PARTITIONS asks for {state.wanted} (`prefstream topics create` says what to do)")
    console.print(f"[green]stack up[/]: {len(states)} topics ({created} created)")
    click.echo(f"PREFSTREAM_BOOTSTRAP={settings.bootstrap}")
    click.echo(f"PREFSTREAM_REDIS_URL={settings.redis_url}")


@stack.command("status")
def stack_status() -> None:
    """Show whether the broker and Redis run and answer; exit 1 if either does not."""
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
    """Stop the broker and Redis started by `stack up` (safe if they already stopped or crashed)."""
    from streams.embedded.stack import Stack

    for name, stopped in Stack(get_settings()).down().items():
        console.print(f"{name}: {'stopped' if stopped else 'was not running'}")


COMMANDS = (stack,)
