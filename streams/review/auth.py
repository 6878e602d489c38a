"""Annotator tokens: configured by the operator, kept only as sha256 hashes in memory."""

from __future__ import annotations

import hashlib
import hmac

from streams.exceptions import ConfigError

MIN_TOKEN_CHARS = 16  # a short token can be guessed over the API (rate limited, but not enough alone)


def _h(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenBook:
    def __init__(self, spec: str, experts: str = "") -> None:
        self._by_hash: dict[bytes, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, token = item.partition(":")
            if not sep or not name:  # the item may be a bare token: never echo it
                raise ConfigError("PREFSTREAM_REVIEW_TOKENS entries must be 'name:token,name:token'; one entry has no "
                                  "'name:' in front of its token")
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(f"PREFSTREAM_REVIEW_TOKENS: the token of annotator '{name}' is shorter than "
                                  f"{MIN_TOKEN_CHARS} characters; give them a longer one (e.g. `openssl rand -hex 16`)")
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
