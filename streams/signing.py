"""Signatures on records: who wrote a record is proven by a key, never by what the record says.

Three kinds of record are signed, each by the one party allowed to write it:

- PreferencePair with ``metadata.answer`` / ``metadata.tests`` (a vouch): by its producer, with an
  HMAC-SHA256 key the operator gave it and registered with the workers for one source
  (streams/runtime/curation/trust.py);
- Annotation: by the review app, HMAC-SHA256 (streams/review/app.py; the aggregator, in the same
  process, checks it);
- ModelVersion: by whoever announces (the controller, its retrain jobs, an operator's CLI) with an
  Ed25519 private key; workers hold only the public key, so a worker cannot forge an announcement.

What is signed (the canonical record): the ASCII line ``prefstream:<schema>:v1`` and a newline,
then the record as its consumer decodes it (every field of the schema, defaults filled) serialized
as JSON with sorted keys, no whitespace (separators ``,`` and ``:``), non-ASCII characters as
themselves, in UTF-8. The schema name in the first line keeps a signature on one kind of record from
passing as another's. The key id and the signature (base64) travel in the headers
``prefstream-key-id`` and ``prefstream-signature``; the value's bytes are untouched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.wire import header
from streams.exceptions import ConfigError

KEY_ID_HEADER = "prefstream-key-id"
SIGNATURE_HEADER = "prefstream-signature"
# Shortest HMAC secret accepted: 32 characters (`prefstream keys hmac` makes 43 of base64, 256 bits).
MIN_SECRET_CHARS = 32
MAX_SIGNATURE_BYTES = 512  # a header longer than any signature is not one; never base64-decoded whole

# Why a signature did not prove its record (metric labels and dead-letter reasons).
UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown_key"
BAD_SIGNATURE = "bad_signature"


def canonical(schema: str, record: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers for ``record`` of schema ``schema`` (see the module doc)."""
    body = json.dumps(dict(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a lone surrogate (text decoded from bad bytes) still gives the same bytes on both
    # sides instead of an error in the middle of a verification.
    return f"prefstream:{schema}:v1\n".encode() + body.encode("utf-8", "surrogatepass")


class Signer(Protocol):
    @property
    def key_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


class Verifier(Protocol):
    @property
    def key_id(self) -> str: ...

    def verify(self, message: bytes, signature: bytes) -> bool: ...


@dataclass(frozen=True)
class HmacKey:
    """A shared secret: signs and verifies (HMAC-SHA256). ``key_id`` names it in the header."""

    key_id: str
    secret: bytes = field(repr=False)

    def sign(self, message: bytes) -> bytes:
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def verify(self, message: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self.sign(message), signature)


def hmac_key(secret: str, what: str, key_id: str | None = None) -> HmacKey:
    """An HmacKey from the text of a secret; its id derived from the secret when not given.

    A derived id is a hash of the secret (never the secret), so a rotated key gets a new id.
    """
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"{what}: the secret has {len(secret)} characters; use at least {MIN_SECRET_CHARS} "
                          "random ones (`prefstream keys hmac` makes one)")
    raw = secret.encode()
    return HmacKey(key_id or hashlib.sha256(b"prefstream key id\n" + raw).hexdigest()[:16], raw)


@dataclass(frozen=True)
class Ed25519Signer:
    """An Ed25519 private key (announcements); its id is that of its public key."""

    key: Ed25519PrivateKey = field(repr=False)

    @property
    def key_id(self) -> str:
        return public_key_id(self.key.public_key())

    def public(self) -> Ed25519Verifier:
        return Ed25519Verifier(self.key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


@dataclass(frozen=True)
class Ed25519Verifier:
    key: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return public_key_id(self.key)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def public_key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16]


def new_ed25519() -> tuple[str, str]:
    """(private, public) of a new Ed25519 key pair, each the base64 of its 32 raw bytes."""
    key = Ed25519PrivateKey.generate()
    return _b64(key.private_bytes_raw()), _b64(key.public_key().public_bytes_raw())


def ed25519_signer(text: str, what: str) -> Ed25519Signer:
    """The private key in ``text`` (base64 of its 32 raw bytes), or ConfigError naming ``what``."""
    return Ed25519Signer(Ed25519PrivateKey.from_private_bytes(_raw32(text, what, "private")))


def ed25519_verifiers(text: str, what: str) -> dict[str, Ed25519Verifier]:
    """Key id -> public key, from comma-separated base64 public keys (several while a key is rotated)."""
    out = {}
    for part in (p.strip() for p in text.split(",")):
        if part:
            verifier = Ed25519Verifier(Ed25519PublicKey.from_public_bytes(_raw32(part, what, "public")))
            out[verifier.key_id] = verifier
    if not out:
        raise ConfigError(f"{what} is empty; give the announcer's public key (base64, from `prefstream keys announce`)")
    return out


def _raw32(text: str, what: str, kind: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{what}: not an Ed25519 {kind} key (expected the base64 of 32 bytes, got "
                          f"{len(text.strip())} characters); make a pair with `prefstream keys announce`")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def sign_headers(schema: str, record: Mapping[str, Any], signer: Signer) -> list[tuple[str, bytes]]:
    """The headers that carry ``signer``'s signature of ``record``."""
    signature = signer.sign(canonical(schema, record))
    return [(KEY_ID_HEADER, signer.key_id.encode()), (SIGNATURE_HEADER, base64.b64encode(signature))]


def signed_by(headers: Any) -> str | None:
    """The key id a record's headers name, or None when they name none."""
    raw = header(headers, KEY_ID_HEADER)
    return raw.decode("utf-8", "replace")[:128] if raw else None


def check(schema: str, record: Mapping[str, Any], headers: Any,
          lookup: Callable[[str], Verifier | None]) -> str | None:
    """None when ``headers`` carry a valid signature of ``record`` by a key ``lookup`` knows, else the reason:
    ``unsigned`` (no signature), ``unknown_key`` (a key id nobody configured) or ``bad_signature``."""
    key_id, encoded = signed_by(headers), header(headers, SIGNATURE_HEADER)
    if key_id is None or not encoded:
        return UNSIGNED
    verifier = lookup(key_id)
    if verifier is None:
        return UNKNOWN_KEY
    try:
        if len(encoded) > MAX_SIGNATURE_BYTES:
            return BAD_SIGNATURE
        signature = base64.b64decode(encoded, validate=True)
        message = canonical(schema, record)
    except (binascii.Error, ValueError, TypeError):  # not base64, or a record value JSON cannot hold
        return BAD_SIGNATURE
    return None if verifier.verify(message, signature) else BAD_SIGNATURE
