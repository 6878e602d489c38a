"""`prefstream models list|show|publish|promote|rollback`: the model store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from streams.cli.common import console
from streams.settings import get_settings


@click.group("models")
@click.option("--store", default=None,
              help="Model store: a directory or s3://bucket/prefix (default: PREFSTREAM_MODELS_URL, else "
                   "PREFSTREAM_MODELS_DIR).")
@click.pass_context
def models(ctx: click.Context, store: str | None) -> None:
    """List, inspect, publish, promote and roll back model versions in the model store."""
    from trainers.storage.registry import open_store

    settings = get_settings()
    ctx.obj = (open_store(store, settings.models_cache_dir or settings.home / "model-cache", settings.s3_endpoint)
               if store else settings.model_store())


def announcer(enabled: bool) -> Any:
    """The announcer for a store change, or None (with a warning) when asked not to or no broker answers."""
    if not enabled:
        return None
    from streams.kafka.announce import announcer_if_reachable

    ann = announcer_if_reachable(get_settings())
    if ann is None:
        console.print("[yellow]no broker answers; the change is recorded in the store but not announced[/]")
    return ann


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version instead of a table.")
@click.pass_obj
def models_list(store: Any, as_json: bool) -> None:
    """Every version with its role, parent, headline metrics and calibration temperature; * marks the serving ones."""
    serving = {store.serving(r): r for r in ("current", "gold")}
    if as_json:
        for v in store.list():
            click.echo(json.dumps({"version": v.version, "role": v.role, "serving": v.version in serving,
                                   "parent": v.manifest.get("parent"), "metrics": v.metrics,
                                   "temperature": v.temperature}))
        return
    table = Table("", "version", "role", "parent", "eval_accuracy", "pairs", "temperature")
    for v in store.list():
        table.add_row("*" if v.version in serving else "", v.version, v.role, v.manifest.get("parent") or "-",
                      f"{v.metrics.get('eval_accuracy', float('nan')):.4f}", str(v.metrics.get("train_pairs", "-")),
                      f"{v.temperature:.3g}")
    Console(width=max(Console().width, 140)).print(table)


@models.command("show")
@click.argument("version")
@click.pass_obj
def models_show(store: Any, version: str) -> None:
    """Print the manifest of VERSION after verifying every file's sha256."""
    info = store.verify(version)
    click.echo(json.dumps(info.manifest, indent=2))


@models.command("publish")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--role", type=click.Choice(["current", "gold"]), default="current", show_default=True)
@click.option("--parent", default=None, help="Version it was trained from.")
@click.option("--announce/--no-announce", default=True, show_default=True, help="Announce on models.versions.")
@click.pass_obj
def models_publish(store: Any, model: Path, role: str, parent: str | None, announce: bool) -> None:
    """Copy MODEL into the store atomically as a new version and serve it for ROLE."""
    info = store.publish(model, role, parent=parent, announce=announcer(announce))
    click.echo(info.version)


@models.command("promote")
@click.argument("version")
@click.option("--role", type=click.Choice(["current", "gold"]), default=None,
              help="The version's own role (the default); any other is refused, as workers refuse it.")
@click.option("--announce/--no-announce", default=True, show_default=True)
@click.pass_obj
def models_promote(store: Any, version: str, role: str | None, announce: bool) -> None:
    """Serve VERSION for its role (verified first) and announce it."""
    rec = store.promote(version, role or store.get(version).role, announce=announcer(announce))
    console.print(f"{rec['role']} now serves {rec['version']}")


@models.command("rollback")
@click.option("--role", type=click.Choice(["current", "gold"]), default="current", show_default=True)
@click.option("--announce/--no-announce", default=True, show_default=True)
@click.pass_obj
def models_rollback(store: Any, role: str, announce: bool) -> None:
    """Serve the previous version of ROLE again and announce it; scorers swap back."""
    rec = store.rollback(role, announce=announcer(announce))
    console.print(f"{role} rolled back to {rec['version']}")



COMMANDS = (models,)
