"""Where each service finds its keys: its settings (from a Kubernetes Secret), else PREFSTREAM_HOME/keys.

The embedded stack (``prefstream stack up``, ``prefstream up``, ``make demo``) generates the keys it
lacks under ``PREFSTREAM_HOME/keys`` (files readable by their owner only), so every service on this
machine finds them there:

    announce.key     Ed25519 private key of announcements (controller, retrain jobs, `prefstream models`)
    announce.pub     its public key (workers)
    review.key       HMAC secret of the review app's Annotations (review app and aggregator)
    generator.key    HMAC secret of the demo generator (`prefstream generate`, the demo's producer)
    producer-keys    the workers' producer keys, one ``key_id:source:secret`` a line (the generator's)

A setting always wins over a file, and in Kubernetes only settings exist: each pod's Secret holds just
the keys it needs (the workers get the public key, never the private one).
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from pathlib import Path

from streams.exceptions import ConfigError
from streams.settings import ProducerSettings, ReviewSettings, Settings, WorkerSettings
from streams.signing import (
    Ed25519Signer,
    Ed25519Verifier,
    HmacKey,
    ed25519_signer,
    ed25519_verifiers,
    hmac_key,
    new_ed25519,
)

ANNOUNCE_KEY = "announce.key"
ANNOUNCE_PUB = "announce.pub"
REVIEW_KEY = "review.key"
GENERATOR_KEY = "generator.key"
PRODUCER_KEYS = "producer-keys"
# The demo generator's key id and the source the workers accept it for (streams/local/generate.py).
GENERATOR_KEY_ID = "prefstream-generate"
GENERATOR_SOURCE = "prefstream-generate"


def keys_dir(settings: Settings) -> Path:
    return Path(settings.home) / "keys"


def new_hmac_secret() -> str:
    return secrets.token_urlsafe(32)


def ensure_local_keys(settings: Settings) -> Path:
    """Generate the keys missing under PREFSTREAM_HOME/keys (the embedded stack's); the directory.

    Each file is written whole and linked into place only if it does not exist yet, so services
    starting at once never read half a key nor end with two different ones.
    """
    directory = keys_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    private, _ = new_ed25519()
    _create(directory / ANNOUNCE_KEY, private)
    signer = ed25519_signer(_read(directory / ANNOUNCE_KEY), str(directory / ANNOUNCE_KEY))
    public = signer.public().key.public_bytes_raw()
    _create(directory / ANNOUNCE_PUB, base64.b64encode(public).decode())
    _create(directory / REVIEW_KEY, new_hmac_secret())
    _create(directory / GENERATOR_KEY, new_hmac_secret())
    _create(directory / PRODUCER_KEYS,
            f"{GENERATOR_KEY_ID}:{GENERATOR_SOURCE}:{_read(directory / GENERATOR_KEY)}\n")
    return directory


def _create(path: Path, text: str) -> None:
    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text.strip() + "\n")
        try:
            os.link(tmp, path)  # fails if another process made it first; theirs stands
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _local(settings: Settings, name: str) -> str | None:
    path = keys_dir(settings) / name
    return _read(path) if path.is_file() else None


def announce_signer(settings: Settings) -> Ed25519Signer:
    """The announcements' private key: PREFSTREAM_ANNOUNCE_SIGNING_KEY, else PREFSTREAM_HOME/keys/announce.key."""
    if settings.announce_signing_key is not None:
        return ed25519_signer(settings.announce_signing_key.get_secret_value(), "PREFSTREAM_ANNOUNCE_SIGNING_KEY")
    text = _local(settings, ANNOUNCE_KEY)
    if text is None:
        raise ConfigError(
            "no key to sign model announcements: set PREFSTREAM_ANNOUNCE_SIGNING_KEY (Kubernetes: the controller's "
            "and retrain's Secrets; `prefstream keys announce` makes a pair), or start the embedded stack "
            f"(`prefstream stack up`), which generates one in {keys_dir(settings)}")
    return ed25519_signer(text, str(keys_dir(settings) / ANNOUNCE_KEY))


def announce_verifiers(settings: Settings) -> dict[str, Ed25519Verifier]:
    """Key id -> public key of announcements: PREFSTREAM_ANNOUNCE_PUBLIC_KEY, else PREFSTREAM_HOME/keys/announce.pub."""
    if settings.announce_public_key:
        return ed25519_verifiers(settings.announce_public_key, "PREFSTREAM_ANNOUNCE_PUBLIC_KEY")
    text = _local(settings, ANNOUNCE_PUB)
    if text is None:
        raise ConfigError(
            "no public key to check model announcements: set PREFSTREAM_ANNOUNCE_PUBLIC_KEY to the announcer's public "
            "key (Kubernetes: the worker's Secret), or start the embedded stack (`prefstream stack up`), which "
            f"generates a pair in {keys_dir(settings)}")
    return ed25519_verifiers(text, str(keys_dir(settings) / ANNOUNCE_PUB))


def review_keys(settings: Settings, rsettings: ReviewSettings) -> list[HmacKey]:
    """The review app's Annotation keys, the first one signing: PREFSTREAM_REVIEW_SIGNING_KEY (comma-separated
    while a key is rotated), else PREFSTREAM_HOME/keys/review.key."""
    if rsettings.signing_key is not None:
        text, what = rsettings.signing_key.get_secret_value(), "PREFSTREAM_REVIEW_SIGNING_KEY"
    else:
        text, what = _local(settings, REVIEW_KEY) or "", str(keys_dir(settings) / REVIEW_KEY)
    if not text.strip():
        raise ConfigError(
            "no key to sign Annotations: set PREFSTREAM_REVIEW_SIGNING_KEY (Kubernetes: the review app's Secret; "
            "`prefstream keys hmac` makes one), or start the embedded stack (`prefstream stack up`), which generates "
            f"one in {keys_dir(settings)}")
    return [hmac_key(part, what) for part in text.split(",") if part.strip()]


def producer_keys_text(settings: Settings, wsettings: WorkerSettings) -> str:
    """The workers' producer keys: PREFSTREAM_WORKER_PRODUCER_KEYS, else PREFSTREAM_HOME/keys/producer-keys, else none."""
    if wsettings.producer_keys is not None:
        return wsettings.producer_keys.get_secret_value()
    return _local(settings, PRODUCER_KEYS) or ""


def producer_signer(psettings: ProducerSettings | None = None) -> HmacKey | None:
    """The SDK's key from PREFSTREAM_PRODUCER_KEY_ID and PREFSTREAM_PRODUCER_KEY; None when neither is set."""
    ps = psettings or ProducerSettings()
    if ps.key_id is None and ps.key is None:
        return None
    if ps.key_id is None or ps.key is None:
        missing = "PREFSTREAM_PRODUCER_KEY" if ps.key is None else "PREFSTREAM_PRODUCER_KEY_ID"
        raise ConfigError(f"{missing} is not set: a producer key needs both its id and its secret")
    return hmac_key(ps.key.get_secret_value(), "PREFSTREAM_PRODUCER_KEY", key_id=ps.key_id)


def generator_signer(settings: Settings) -> HmacKey | None:
    """The demo generator's key from PREFSTREAM_HOME/keys (None when the home has none)."""
    text = _local(settings, GENERATOR_KEY)
    return hmac_key(text, str(keys_dir(settings) / GENERATOR_KEY), key_id=GENERATOR_KEY_ID) if text else None
