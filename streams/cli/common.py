"""What the command modules share: the stderr console, the progress bar, the logging setup."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Messages and progress go to stderr so that stdout carries only data (JSON lines, versions).
console = Console(stderr=True)


BROKERS_HELP = (
    "Run this many embedded brokers (Tansu) as one cluster over the object store; more than one needs "
    "--durable. They listen on the PREFSTREAM_BOOTSTRAP port and the ports after it (or on the addresses "
    "PREFSTREAM_BOOTSTRAP lists), and every prefstream process is given all of them. Reads from a broker "
    "other than the writer lag up to 5 s (docs/operations.md).")


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def to_json(record: Any) -> str:
    """One JSON line for a decoded record; bytes (a dead letter's original key, value and headers)
    become base64 strings, so every topic prints as JSON."""
    return json.dumps(record, ensure_ascii=False, default=_bytes_as_base64)


def _bytes_as_base64(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot print {type(value).__name__} as JSON")
