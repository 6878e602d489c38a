"""Annotations are proven to come from the review app: it signs each one; the aggregator and the
feeder's rebuild count only those it signed.

prefs.annotations can be written by anyone whose Kafka credentials allow it, and a record's fields
(``expert``, ``annotator``) are whatever its writer put there. The app signs the record it wrote
(HMAC-SHA256 over the canonical Annotation, streams/signing.py) with PREFSTREAM_REVIEW_SIGNING_KEY;
the aggregator, in the same process, sends an Annotation without a valid signature to prefs.dlq
with the reason ``annotation_unsigned``, ``annotation_unknown_key`` or ``annotation_bad_signature``.
The expert flag in a signed Annotation is the app's: the token's role (PREFSTREAM_REVIEW_EXPERTS)
on an expert task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from streams import signing
from streams.review import metrics

SCHEMA = "Annotation"
REASON_PREFIX = "annotation_"


class AnnotationKeys:
    """The review app's keys: the first signs, every one verifies (several while a key is rotated)."""

    def __init__(self, keys: Sequence[signing.HmacKey]) -> None:
        self.signer = keys[0]
        self.by_id = {k.key_id: k for k in keys}

    def headers(self, codec: Any, value: bytes, headers: list[tuple[str, bytes]], topic: str) -> list[tuple[str, bytes]]:
        """``headers`` with the signature of the Annotation in ``value``, signed as its consumers decode it."""
        return headers + signing.sign_headers(SCHEMA, codec.decode(SCHEMA, value, headers, topic), self.signer)

    def check(self, ann: Mapping[str, Any], headers: Any) -> str | None:
        """None when the app signed ``ann``; else the dead-letter reason (counted on /metrics)."""
        reason = signing.check(SCHEMA, ann, headers, self.by_id.get)
        if reason is None:
            return None
        metrics.ANNOTATIONS_REFUSED.labels(reason).inc()
        return REASON_PREFIX + reason


def detail(reason: str, ann: Mapping[str, Any]) -> str:
    """The dead letter's explanation of a refused Annotation."""
    return (f"Annotation {str(ann.get('annotation_id', '?'))[:200]!r} is not signed by the review app ({reason}): only "
            "verdicts given through the review app count; submit it there (the app signs with "
            "PREFSTREAM_REVIEW_SIGNING_KEY)")
