"""Which producers may vouch for their own pairs.

``metadata.answer`` (the expected result of a math prompt) and ``metadata.tests`` (code that decides a
code pair) let a verifier decide a pair, and flip its label, with no model and no human looking. A
producer could use them to write any label it likes straight into the training data, so they are
honoured only for sources the operator listed (PREFSTREAM_WORKER_TRUSTED_SOURCES). For any other
source the verifiers see the pair without them: the math verifier may still check an arithmetic
expression in the prompt itself, and code pairs take the model route.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

VOUCHING_KEYS = ("answer", "tests")


def for_verifier(pair: dict[str, Any], trusted_sources: Collection[str]) -> dict[str, Any]:
    """The pair as the verifiers may see it: ``pair`` itself if its source is trusted, else a copy without vouching keys."""
    meta = pair.get("metadata") or {}
    if pair.get("source") in trusted_sources or not any(k in meta for k in VOUCHING_KEYS):
        return pair
    return pair | {"metadata": {k: v for k, v in meta.items() if k not in VOUCHING_KEYS}}
