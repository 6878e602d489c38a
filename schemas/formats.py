"""External preference-data formats converted to PreferencePair dicts (not yet validated).

HH-RLHF transcripts (``{"chosen": transcript, "rejected": transcript}``, split on the last
``\n\nAssistant:``) and JudgeBench (``question``, ``response_A``, ``response_B``, ``label``).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.exceptions import InvalidRecordError

FORMATS = ("json", "hh-rlhf", "judgebench")


class FormatError(InvalidRecordError):
    """A line that does not fit the external format it is read as."""

    def __init__(self, message: str) -> None:
        super().__init__("", message, "bad_format")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_LAST = "\n\nAssistant:"
_ROLE = {"Human": "user", "Assistant": "assistant"}


def _strip_marker_space(text: str) -> str:
    # "Assistant: hello" -> "hello": the transcript format puts one space after the colon.
    return text[1:] if text.startswith(" ") else text


def hh_transcript_turns(transcript: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript into {role, content} turns."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3:
        raise FormatError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns in the transcript")
    turns = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        turns.append({"role": _ROLE[role], "content": _strip_marker_space(content)})
    return turns


def from_hh_rlhf(obj: dict[str, Any]) -> dict[str, Any]:
    """{"chosen": transcript, "rejected": transcript} split on the last "\\n\\nAssistant:"."""
    try:
        chosen, rejected = obj["chosen"], obj["rejected"]
    except KeyError as exc:
        raise FormatError(f"HH-RLHF line lacks {exc.args[0]!r}") from None
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise FormatError("HH-RLHF 'chosen' and 'rejected' must be transcript strings")
    c_idx, r_idx = chosen.rfind(_HH_LAST), rejected.rfind(_HH_LAST)
    if c_idx < 0 or r_idx < 0:
        raise FormatError("HH-RLHF transcript without a final '\\n\\nAssistant:' turn")
    prefix = chosen[:c_idx]
    if rejected[:r_idx] != prefix:
        raise FormatError("HH-RLHF chosen and rejected transcripts differ before the last assistant turn")
    return {
        "conversation": hh_transcript_turns(prefix),
        "chosen": _strip_marker_space(chosen[c_idx + len(_HH_LAST):]),
        "rejected": _strip_marker_space(rejected[r_idx + len(_HH_LAST):]),
        "source": "hh-rlhf",
        "label_source": "human",
    }


def from_judgebench(obj: dict[str, Any]) -> dict[str, Any]:
    """{"question", "response_A", "response_B", "label": "A>B" | "B>A"}."""
    try:
        question, a, b, label = obj["question"], obj["response_A"], obj["response_B"], obj["label"]
    except KeyError as exc:
        raise FormatError(f"JudgeBench line lacks {exc.args[0]!r}") from None
    if label not in ("A>B", "B>A"):
        raise FormatError(f"JudgeBench label is {label!r}; expected 'A>B' or 'B>A'")
    chosen, rejected = (a, b) if label == "A>B" else (b, a)
    pair: dict[str, Any] = {"prompt": question, "chosen": chosen, "rejected": rejected, "source": "judgebench", "label_source": "human"}
    if "pair_id" in obj:
        pair["pair_id"] = obj["pair_id"]
    return pair


def from_json(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


READERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "json": from_json, "hh-rlhf": from_hh_rlhf, "judgebench": from_judgebench,
}


def detect(obj: Any) -> str:
    """Guess the format of one parsed line."""
    if isinstance(obj, dict):
        if {"question", "response_A", "response_B", "label"} <= obj.keys():
            return "judgebench"
        if set(obj) == {"chosen", "rejected"} and isinstance(obj.get("chosen"), str) and "\n\nAssistant:" in obj["chosen"]:
            return "hh-rlhf"
    return "json"




# ---------------------------------------------------------------------------- the one JSONL reader
@dataclass(frozen=True)
class JsonlLine:
    """One non-blank line of a JSONL file: its number and the parsed object, or why it did not parse."""

    lineno: int
    obj: dict[str, Any] | FormatError


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a JSONL file, gunzipping *.gz, ``-`` for standard input; bad bytes are kept
    (surrogateescape) for the validation to report as invalid UTF-8 instead of failing the file."""
    path = Path(path)
    if str(path) == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape")
    return path.open("r", encoding="utf-8", errors="surrogateescape")


def jsonl_objects(path: str | Path) -> Iterator[JsonlLine]:
    """Every non-blank line of a JSONL file parsed to a JSON object, or a FormatError saying why not."""
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield JsonlLine(lineno, FormatError(f"line {lineno}: not valid JSON ({exc.msg})"))
                continue
            except RecursionError:
                yield JsonlLine(lineno, FormatError(f"line {lineno}: JSON nested too deeply"))
                continue
            if not isinstance(obj, dict):
                yield JsonlLine(lineno, FormatError(f"line {lineno}: a line must be a JSON object, got {type(obj).__name__}"))
                continue
            yield JsonlLine(lineno, obj)


def read_objects(path: str | Path) -> list[dict[str, Any]]:
    """Every object of a JSONL file this project wrote (*.gz gunzipped), or FormatError naming the bad line."""
    out = []
    for line in jsonl_objects(path):
        if isinstance(line.obj, FormatError):
            raise FormatError(f"{path}: {line.obj}")
        out.append(line.obj)
    return out


def read_pair_lines(path: str | Path, fmt: str = "auto") -> Iterator[JsonlLine]:
    """Pairs (not yet validated) from a JSONL file in one of FORMATS, or a FormatError per bad line.

    With ``fmt="auto"`` the format is detected once, from the first line that parses, so one odd
    line cannot switch the format in the middle of a file.
    """
    if fmt != "auto" and fmt not in READERS:
        raise FormatError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    chosen = None if fmt == "auto" else fmt
    for line in jsonl_objects(path):
        if isinstance(line.obj, FormatError):
            yield line
            continue
        chosen = chosen or detect(line.obj)
        try:
            yield JsonlLine(line.lineno, READERS[chosen](line.obj))
        except FormatError as exc:
            yield JsonlLine(line.lineno, FormatError(f"line {line.lineno}: {exc}"))
