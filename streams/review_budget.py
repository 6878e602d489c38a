"""The text form of PREFSTREAM_WORKER_REVIEW_BUDGET, parsed.

It sits beside settings.py, below the packages, so the settings can refuse a malformed budget at
start-up without importing the worker; streams/runtime/curation/budget.py spends the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streams.exceptions import ConfigError

_PER_HOUR = re.compile(r"(\d+)\s*/\s*h")
_SHARE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*%")
ACCEPTED_FORMS = "'N/h' (review tasks per hour, e.g. 120/h) or 'X%' (share of the pairs scored, e.g. 30%)"


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed PREFSTREAM_WORKER_REVIEW_BUDGET: exactly one of ``per_hour`` and ``share`` is set."""

    text: str
    per_hour: int | None = None
    share: float | None = None  # 0..1


def parse_budget(text: str | None) -> BudgetSpec | None:
    """The budget ``text`` names, None when unset or empty (no budget), else ConfigError naming the forms."""
    if text is None or not text.strip():
        return None
    value = text.strip().lower()
    if m := _PER_HOUR.fullmatch(value):
        return BudgetSpec(value.replace(" ", ""), per_hour=int(m.group(1)))
    if m := _SHARE.fullmatch(value):
        share = float(m.group(1))
        if share <= 100:
            return BudgetSpec(value.replace(" ", ""), share=share / 100)
    raise ConfigError(f"PREFSTREAM_WORKER_REVIEW_BUDGET={text!r} is not a budget: use {ACCEPTED_FORMS}, "
                      "with X at most 100, or leave it unset for no budget")
