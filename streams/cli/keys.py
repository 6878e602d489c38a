"""`prefstream keys`: new keys for the Secrets of a cluster (the embedded stack makes its own)."""

from __future__ import annotations

import click


@click.group()
def keys() -> None:
    """Make the keys that prove who wrote a record (docs/design.md, "Who can write what").

    The embedded stack generates its keys under PREFSTREAM_HOME/keys; a cluster's come from these
    commands into its Secrets (docs/operations.md, Kubernetes).
    """


@keys.command("announce")
def keys_announce() -> None:
    """Print a new Ed25519 key pair for model announcements: the private key, a space, the public key.

    The private key goes to PREFSTREAM_ANNOUNCE_SIGNING_KEY of the controller and the retrain jobs, the
    public key to PREFSTREAM_ANNOUNCE_PUBLIC_KEY of the workers (both base64 of 32 bytes).
    """
    from streams.signing import new_ed25519

    private, public = new_ed25519()
    click.echo(f"{private} {public}")


@keys.command("hmac")
def keys_hmac() -> None:
    """Print a new HMAC secret (256 bits, URL-safe base64).

    For PREFSTREAM_REVIEW_SIGNING_KEY (the review app), and for a producer's key: the producer gets
    PREFSTREAM_PRODUCER_KEY_ID and PREFSTREAM_PRODUCER_KEY, the workers the entry KEY_ID:SOURCE:SECRET
    in PREFSTREAM_WORKER_PRODUCER_KEYS.
    """
    from streams.keys import new_hmac_secret

    click.echo(new_hmac_secret())


COMMANDS = (keys,)
