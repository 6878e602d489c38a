"""The `prefstream` command line: one module per command group, registered on `main` here.

Each command imports the heavy parts it needs (torch, transformers, the worker) inside its body, so
`prefstream --help` and the light commands start without them.
"""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from schemas.exceptions import PrefstreamError
from streams.cli.common import console


class _Group(click.Group):
    """Turns prefstream's own errors into one red line and exit code 1, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PrefstreamError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(1)
        except ValidationError as exc:  # a PREFSTREAM_* variable its settings class refuses
            console.print(f"[bold red]error:[/] {_setting_error(exc)}", highlight=False)
            sys.exit(1)


def _setting_error(exc: ValidationError) -> str:
    """One line per refused setting, named by its environment variable, with pydantic's reason."""
    from streams import settings

    cls = getattr(settings, exc.title, None)
    prefix = cls.model_config.get("env_prefix", "") if isinstance(cls, type) and issubclass(cls, BaseSettings) else ""
    lines = []
    for e in exc.errors():
        name, msg = f"{prefix}{'_'.join(map(str, e['loc'])).upper()}", e["msg"].removeprefix("Value error, ")
        lines.append(msg if msg.startswith(name) else f"{name}={e.get('input')!r}: {msg}")
    return "; ".join(lines)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="prefstream")
def main() -> None:
    """prefstream: a streaming data engine that keeps a reward model learning from live preference data.

    Settings come from PREFSTREAM_* environment variables (PREFSTREAM_BOOTSTRAP,
    PREFSTREAM_REDIS_URL, PREFSTREAM_HOME, PREFSTREAM_TOPIC_PREFIX, SCHEMA_REGISTRY_URL, ...);
    the defaults run everything on this machine. Start with `prefstream stack up`, or
    `prefstream up` for the whole system with a live status.
    """


def _register() -> None:
    from streams.cli import dlq, io, keys, local, models, services, stack, topics, train

    for module in (stack, topics, io, dlq, services, train, models, keys, local):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
