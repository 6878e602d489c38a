"""Which pairs may vouch for themselves: those signed by a key the operator gave their source.

``metadata.answer`` (the expected result of a math prompt) and ``metadata.tests`` (code that decides a
code pair) let a verifier decide a pair, and flip its label, with no model and no human looking. A
record's ``source`` is whatever its producer wrote, so it proves nothing: a vouch counts only on a pair
signed (streams/signing.py, HMAC-SHA256 over the canonical PreferencePair) with a key listed in
PREFSTREAM_WORKER_PRODUCER_KEYS for the pair's own source. Ingest strips every other vouch before any
stage sees it and counts it in ``prefstream_vouches_stripped_total`` by reason: ``unsigned``,
``unknown_key``, ``bad_signature`` or ``source_mismatch`` (a real key used for another source). The
math verifier may still check an arithmetic expression in the prompt itself, and code pairs take the
model route.

The SDK signs the pair as the workers decode it (streams/sdk.py). A producer writing JSON signs what
``schemas.pairs.validate_pair`` makes of its pair, and so must give ``created_at``: left out, the
worker's clock fills it in and the signature no longer matches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams import signing
from streams.exceptions import ConfigError
from streams.runtime import metrics

log = logging.getLogger(__name__)

VOUCHING_KEYS = ("answer", "tests")
SCHEMA = "PreferencePair"
SOURCE_MISMATCH = "source_mismatch"
# Stripped vouches are logged once per (source, reason) up to this many, so a noisy producer is seen
# in the log without flooding it; the counter counts every one.
MAX_LOGGED = 100


@dataclass(frozen=True)
class ProducerKey:
    key: signing.HmacKey
    source: str


class ProducerKeyring:
    """The producer keys a worker accepts vouches from, each bound to one source."""

    def __init__(self, keys: Mapping[str, ProducerKey] | None = None) -> None:
        self.keys = dict(keys or {})
        self._logged: set[tuple[str, str]] = set()

    @classmethod
    def parse(cls, text: str, what: str = "PREFSTREAM_WORKER_PRODUCER_KEYS") -> ProducerKeyring:
        """Entries 'key_id:source:secret', separated by commas or newlines; ConfigError naming a bad one."""
        keys: dict[str, ProducerKey] = {}
        for n, entry in enumerate((e.strip() for e in text.replace("\n", ",").split(",")), 1):
            if not entry or entry.startswith("#"):
                continue
            parts = entry.split(":", 2)
            if len(parts) != 3 or not parts[0] or not parts[1]:
                raise ConfigError(f"{what}: entry {n} ({parts[0][:40]}...) is not 'key_id:source:secret'; give each "
                                  "producer key as its id, the source it may vouch for and its secret")
            key_id, source, secret = parts
            if key_id in keys:
                raise ConfigError(f"{what}: key id {key_id!r} is listed twice; give each key its own id")
            keys[key_id] = ProducerKey(signing.hmac_key(secret, f"{what} (key {key_id})", key_id=key_id), source)
        return cls(keys)

    def _signer(self, headers: Any) -> ProducerKey:
        """The key whose signature ``check`` accepted on ``headers``."""
        key_id = signing.signed_by(headers)
        if key_id is None:
            raise KeyError("the record is unsigned")
        return self.keys[key_id]

    def check(self, pair: Mapping[str, Any], headers: Any) -> str | None:
        """None when ``pair`` (as decoded, before normalisation) is signed by a key of its own source, else why not."""
        reason = signing.check(SCHEMA, pair, headers, lambda kid: k.key if (k := self.keys.get(kid)) else None)
        if reason is None and self._signer(headers).source != pair.get("source"):
            return SOURCE_MISMATCH
        return reason

    def admit(self, pair: dict[str, Any], headers: Any) -> dict[str, Any]:
        """``pair`` itself when it vouches with a valid signature or does not vouch; else a copy without the vouch."""
        meta = pair.get("metadata") or {}
        if not any(k in meta for k in VOUCHING_KEYS):
            return pair
        reason = self.check(pair, headers)
        if reason is None:
            metrics.VOUCHES_ACCEPTED.labels(self._signer(headers).source[:80]).inc()
            return pair
        metrics.VOUCHES_STRIPPED.labels(reason).inc()
        source = str(pair.get("source", ""))[:80]
        if (source, reason) not in self._logged and len(self._logged) < MAX_LOGGED:
            self._logged.add((source, reason))
            log.warning("pairs from source %r vouch (metadata.answer/tests) without a valid key (%s): the vouch is "
                        "ignored; give the producer a key in PREFSTREAM_WORKER_PRODUCER_KEYS", source, reason)
        return strip(pair)


def strip(pair: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``pair`` without the vouching metadata keys."""
    meta = pair.get("metadata") or {}
    return pair | {"metadata": {k: v for k, v in meta.items() if k not in VOUCHING_KEYS}}


def sign_pair(record: Mapping[str, Any], key: signing.HmacKey) -> list[tuple[str, bytes]]:
    """The headers that sign ``record`` (a PreferencePair as its consumer decodes it) with a producer key."""
    return signing.sign_headers(SCHEMA, record, key)
