"""External preference-data formats converted to PreferencePair dicts (not yet validated).

HH-RLHF transcripts (``{"chosen": transcript, "rejected": transcript}``, split on the last
``\n\nAssistant:``) and JudgeBench (``question``, ``response_A``, ``response_B``, ``label``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
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


