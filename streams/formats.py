"""Input file formats for `prefstream produce`: our JSON, HH-RLHF transcripts, JudgeBench.

Each reader turns one parsed JSON line into a PreferencePair dict (not yet validated); the codec
validates. A line that fits no format raises InputFormatError with the reason.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streams.exceptions import InputFormatError

FORMATS = ("json", "hh-rlhf", "judgebench")
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
        raise InputFormatError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns in the transcript")
    turns = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        turns.append({"role": _ROLE[role], "content": _strip_marker_space(content)})
    return turns


def from_hh_rlhf(obj: dict[str, Any]) -> dict[str, Any]:
    """{"chosen": transcript, "rejected": transcript} split on the last "\\n\\nAssistant:"."""
    try:
        chosen, rejected = obj["chosen"], obj["rejected"]
    except KeyError as exc:
        raise InputFormatError(f"HH-RLHF line lacks {exc.args[0]!r}") from None
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise InputFormatError("HH-RLHF 'chosen' and 'rejected' must be transcript strings")
    c_idx, r_idx = chosen.rfind(_HH_LAST), rejected.rfind(_HH_LAST)
    if c_idx < 0 or r_idx < 0:
        raise InputFormatError("HH-RLHF transcript without a final '\\n\\nAssistant:' turn")
    prefix = chosen[:c_idx]
    if rejected[:r_idx] != prefix:
        raise InputFormatError("HH-RLHF chosen and rejected transcripts differ before the last assistant turn")
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
        raise InputFormatError(f"JudgeBench line lacks {exc.args[0]!r}") from None
    if label not in ("A>B", "B>A"):
        raise InputFormatError(f"JudgeBench label is {label!r}; expected 'A>B' or 'B>A'")
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


def open_text(path: Path) -> io.TextIOBase:
    """Open a JSONL file, gunzipping *.gz; bad bytes are kept (surrogateescape) for the codec to report."""
    if str(path) == "-":
        import sys

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
                    raise InputFormatError(f"a line must be a JSON object, got {type(obj).__name__}")
                yield lineno, READERS[chosen_fmt](obj)
            except InputFormatError as exc:
                yield lineno, InputFormatError(f"line {lineno}: {exc}")
