"""A minimal S3 client: AWS Signature Version 4 over httpx, path-style requests.

Enough for the embedded object store (buckets, small objects): creating the broker's bucket and
checking that the store answers. The model store (trainers/storage/s3.py) uses boto3, a core
dependency; this client could be replaced by it.
"""

from __future__ import annotations

import hashlib
import hmac
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from streams.exceptions import ObjectStoreError

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
# Characters that SigV4 leaves unescaped in a path segment or query component.
UNRESERVED = "-_.~"
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(method: str, url: str, credentials: S3Credentials, body: bytes = b"",
         now: datetime | None = None) -> dict[str, str]:
    """The headers that sign one request (Authorization, x-amz-date, x-amz-content-sha256).

    ``url`` must already be encoded the way it is sent (``object_url`` does that).
    """
    parts = urlsplit(url)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body).hexdigest()
    query = "&".join(sorted(
        f"{quote(k, safe=UNRESERVED)}={quote(v, safe=UNRESERVED)}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ))
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([
        method, parts.path or "/", query,
        *(f"{name}:{headers[name]}" for name in sorted(headers)), "", signed, payload,
    ])
    scope = f"{stamp[:8]}/{credentials.region}/{SERVICE}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(f"AWS4{credentials.secret_key}".encode(), stamp[:8])
    for part in (credentials.region, SERVICE, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {
        "Authorization": f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
                         f"SignedHeaders={signed}, Signature={signature}",
        "x-amz-date": stamp,
        "x-amz-content-sha256": payload,
    }


class S3Client:
    """Path-style S3 requests against one endpoint, e.g. ``http://127.0.0.1:8333``."""

    def __init__(self, endpoint_url: str, credentials: S3Credentials, timeout: float = 10.0) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.credentials = credentials
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> S3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def object_url(self, bucket: str = "", key: str = "", params: Mapping[str, str] | None = None) -> str:
        path = "/"
        if bucket:
            path += quote(bucket, safe=UNRESERVED)
            if key:  # a key's slashes stay: S3 keys are flat, "/" is only a naming convention
                path += "/" + quote(key, safe=UNRESERVED + "/")
        query = "&".join(f"{quote(k, safe=UNRESERVED)}={quote(v, safe=UNRESERVED)}" for k, v in (params or {}).items())
        return f"{self.endpoint_url}{path}" + (f"?{query}" if query else "")

    def request(self, method: str, bucket: str = "", key: str = "", body: bytes = b"",
                params: Mapping[str, str] | None = None) -> httpx.Response:
        """One signed request. Connection failures become ObjectStoreError; HTTP statuses are returned."""
        url = self.object_url(bucket, key, params)
        try:
            return self._http.request(method, url, content=body, headers=sign(method, url, self.credentials, body))
        except httpx.HTTPError as exc:
            raise ObjectStoreError(
                f"the object store at {self.endpoint_url} did not answer ({exc}); start it with "
                f"`prefstream stack up --durable` or check PREFSTREAM_OBJECT_STORE_PORT"
            ) from exc

    def _check(self, response: httpx.Response, what: str) -> httpx.Response:
        if response.is_success:
            return response
        try:  # S3 errors are an XML <Error> with a Code and a Message
            root = ET.fromstring(response.content)
            detail = f"{root.findtext('Code')}: {root.findtext('Message')}"
        except ET.ParseError:
            detail = response.text[:300]
        raise ObjectStoreError(
            f"{what} failed with HTTP {response.status_code} from {self.endpoint_url} ({detail})"
            + ("; check the access key and secret" if response.status_code == 403 else "")
        )

    def list_buckets(self) -> list[str]:
        root = ET.fromstring(self._check(self.request("GET"), "listing buckets").content)
        return [el.text or "" for el in root.iter(f"{S3_NS}Name")]

    def bucket_exists(self, bucket: str) -> bool:
        response = self.request("HEAD", bucket)
        if response.status_code == 404:
            return False
        self._check(response, f"checking bucket {bucket!r}")
        return True

    def create_bucket(self, bucket: str) -> bool:
        """Create ``bucket`` unless it exists. True if it was created."""
        if self.bucket_exists(bucket):
            return False
        response = self.request("PUT", bucket)
        if response.status_code == 409:  # created meanwhile by another client
            return False
        self._check(response, f"creating bucket {bucket!r}")
        return True

    def put_object(self, bucket: str, key: str, body: bytes) -> None:
        self._check(self.request("PUT", bucket, key, body), f"writing s3://{bucket}/{key}")

    def get_object(self, bucket: str, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key."""
        response = self.request("GET", bucket, key)
        if response.status_code == 404:
            return None
        return self._check(response, f"reading s3://{bucket}/{key}").content

    def delete_object(self, bucket: str, key: str) -> None:
        response = self.request("DELETE", bucket, key)
        if response.status_code != 404:
            self._check(response, f"deleting s3://{bucket}/{key}")

    def list_keys(self, bucket: str, prefix: str = "") -> Iterator[str]:
        """Every key in ``bucket`` under ``prefix``, in S3's order (ListObjectsV2, all pages)."""
        params = {"list-type": "2", "prefix": prefix}
        while True:
            response = self._check(self.request("GET", bucket, params=params), f"listing s3://{bucket}/{prefix}")
            root = ET.fromstring(response.content)
            for contents in root.iter(f"{S3_NS}Contents"):
                yield contents.findtext(f"{S3_NS}Key") or ""
            token = root.findtext(f"{S3_NS}NextContinuationToken")
            if root.findtext(f"{S3_NS}IsTruncated") != "true" or not token:
                return
            params = {**params, "continuation-token": token}
