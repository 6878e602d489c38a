"""Reading JSONL input files for `prefstream produce` (conversion itself lives in schemas.formats)."""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.formats import FORMATS, READERS, FormatError, detect
from streams.exceptions import InputFormatError

__all__ = ["FORMATS", "read_pairs", "open_text"]


def open_text(path: Path) -> io.TextIOBase:
    """Open a JSONL file, gunzipping *.gz; bad bytes are kept (surrogateescape) for the codec to report."""
    if str(path) == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape")
    return path.open("r", encoding="utf-8", errors="surrogateescape")


def read_pairs(path: Path, fmt: str = "auto") -> Iterator[tuple[int, dict[str, Any] | InputFormatError]]:
    """Yield (line number, pair dict) or (line number, error) for each non-blank line."""
    if fmt != "auto" and fmt not in READERS:
        raise InputFormatError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    chosen_fmt = None if fmt == "auto" else fmt
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, InputFormatError(f"line {lineno}: not valid JSON ({exc.msg})")
                continue
            # Detect once from the first line so one odd line cannot switch the format mid-file.
            chosen_fmt = chosen_fmt or detect(obj)
            try:
                if not isinstance(obj, dict):
                    raise FormatError(f"a line must be a JSON object, got {type(obj).__name__}")
                yield lineno, READERS[chosen_fmt](obj)
            except FormatError as exc:
                yield lineno, InputFormatError(f"line {lineno}: {exc}")
