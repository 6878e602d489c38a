"""Which models.versions announcements a worker acts on.

Anyone whose Kafka credentials let them write models.versions can append a record, and a record says
whatever its writer wants (a role, an old version). A worker serves an announcement only when:

1. it is signed (Ed25519 over the canonical ModelVersion, streams/signing.py) by a key whose public
   half the worker holds (PREFSTREAM_ANNOUNCE_PUBLIC_KEY): the controller, its retrain jobs and the
   `prefstream models` commands sign; a worker cannot, as it holds no private key;
2. it is not older (``announced_at``) than the newest announcement this worker accepted for the
   role, so a signed record re-published later (a replayed rollback) is stale;
3. its role is the role in the version's manifest (the model store's, sha256-checked on load), so a
   current version is never announced as the gold model;
4. its version is not older (manifest ``created_at``) than the one the role serves, unless the
   record is a rollback (``action`` "rollback", signed like any other).

A refusal is logged and counted in ``prefstream_model_announcements_refused_total{role,reason}``
with reason ``unsigned``, ``unknown_key``, ``bad_signature``, ``stale``, ``role_mismatch`` or
``downgrade`` (``unverifiable`` when the serving version's manifest cannot be read to compare ages;
``outside_store`` from the loader, scorer.py); the serving model stays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from streams import signing
from streams.exceptions import ModelRefusedError
from streams.runtime import metrics
from streams.runtime.processors.scorer import announced_version
from trainers.storage.registry import BOOTSTRAP_VERSION, ROLES, ModelStore

log = logging.getLogger(__name__)

SCHEMA = "ModelVersion"
ROLLBACK = "rollback"
STALE, ROLE_MISMATCH, DOWNGRADE, UNVERIFIABLE = "stale", "role_mismatch", "downgrade", "unverifiable"


def role_label(record: Mapping[str, Any]) -> str:
    """The record's role as a metric label: one of ROLES or 'other' (a writer must not mint label values)."""
    role = record.get("role")
    return role if role in ROLES else "other"


def refuse(record: Mapping[str, Any], reason: str, why: str) -> None:
    metrics.ANNOUNCEMENTS_REFUSED.labels(role_label(record), reason).inc()
    log.error("announcement of %s version %.80s refused (%s): %s; the serving model stays", role_label(record),
              str(record.get("version", "?")), reason, why)


class AnnouncementGate:
    """The checks of the module doc, for one worker (its accepted announcements per role in memory)."""

    def __init__(self, verifiers: Mapping[str, signing.Verifier], store: ModelStore) -> None:
        self.verifiers = dict(verifiers)
        self.store = store
        self.latest: dict[str, int] = {}  # role -> announced_at of the newest announcement accepted

    def signed(self, record: Mapping[str, Any], headers: Any) -> bool:
        """Whether a key this worker knows signed ``record`` (refusals are logged and counted)."""
        reason = signing.check(SCHEMA, record, headers, self.verifiers.get)
        if reason is not None:
            refuse(record, reason, "only announcements signed with the announcer's key (PREFSTREAM_ANNOUNCE_SIGNING_KEY) "
                                   "are served; announce with `prefstream models promote` or the controller")
        return reason is None

    def admit(self, record: Mapping[str, Any], serving: str | None) -> bool:
        """Whether to offer the signed ``record`` to its role's slot, which serves ``serving`` (or is about to)."""
        role, announced_at = record["role"], int(record.get("announced_at") or 0)
        if announced_at < self.latest.get(role, announced_at):
            refuse(record, STALE, f"announced at {announced_at}, before the newest {role} announcement this worker "
                                  f"accepted ({self.latest[role]}): a re-published old record")
            return False
        try:
            manifest = self.store.get(announced_version(record)).manifest
        except Exception:  # noqa: BLE001 - a name the store lacks or an unreachable store: the loader refuses it and says why
            return True
        if manifest.get("role") != role:
            refuse(record, ROLE_MISMATCH, f"the version was published for role {manifest.get('role')!r}, not {role!r}; "
                                          f"publish it for {role} (`prefstream models publish`)")
            return False
        try:
            older = record.get("action") != ROLLBACK and self._older_than_serving(manifest, serving)
        except ModelRefusedError as exc:  # cannot compare: refused rather than risk a downgrade
            refuse(record, UNVERIFIABLE, str(exc))
            return False
        if older:
            refuse(record, DOWNGRADE, f"the version is older than the serving {serving}; serving an older version takes "
                                      f"a rollback (`prefstream models rollback {role}`)")
            return False
        self.latest[role] = max(announced_at, self.latest.get(role, announced_at))
        return True

    def _older_than_serving(self, manifest: Mapping[str, Any], serving: str | None) -> bool:
        if serving in (None, BOOTSTRAP_VERSION) or manifest.get("version") == serving:
            return False
        try:
            current = self.store.get(serving).manifest
        except Exception as exc:  # noqa: BLE001 - any store error: the caller refuses
            raise ModelRefusedError(f"cannot read the manifest of the serving version {serving} to compare ages: "
                                    f"{exc}; announce again once the model store answers") from exc
        created, serving_created = manifest.get("created_at"), current.get("created_at")
        return isinstance(created, (int, float)) and isinstance(serving_created, (int, float)) and created < serving_created

    def choose(self, records: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
        """Of one role's signed records read at start-up, the newest announced (not the last on the topic:
        a replayed record may have been appended after it)."""
        return max(records, key=lambda r: int(r.get("announced_at") or 0), default=None)
