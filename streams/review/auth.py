"""Annotator tokens: configured by the operator, kept only as sha256 hashes in memory."""

from __future__ import annotations

import hashlib
import hmac

from streams.exceptions import ConfigError


def _h(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenBook:
    def __init__(self, spec: str, experts: str = "") -> None:
        self._by_hash: dict[bytes, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, token = item.partition(":")
            if not sep or not name or len(token) < 8:
                raise ConfigError("PREFSTREAM_REVIEW_TOKENS entries must be 'name:token' with tokens of 8+ characters")
            self._by_hash[_h(token)] = name
        self.experts = {e.strip() for e in experts.split(",") if e.strip()}

    def who(self, token: str | None) -> str | None:
        if not token:
            return None
        digest = _h(token)
        for known, name in self._by_hash.items():  # constant-time compare against every entry
            if hmac.compare_digest(known, digest):
                return name
        return None

    def __len__(self) -> int:
        return len(self._by_hash)
