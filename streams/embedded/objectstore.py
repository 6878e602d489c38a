"""The embedded object store: SeaweedFS (`weed server` with its S3 gateway) as a child process.

It gives the embedded broker durable storage (`prefstream stack up --durable`) and anything else
an S3 bucket. Data lives under ``<PREFSTREAM_HOME>/seaweedfs``; the S3 identity is generated at
first start into ``<PREFSTREAM_HOME>/seaweedfs/s3.json`` (SeaweedFS's own identities format, mode
0600) and reused after, so the data stays readable across restarts.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from streams.embedded import binaries
from streams.embedded.process import ServerProcess, free_port, port_frees
from streams.embedded.s3 import S3Client, S3Credentials
from streams.exceptions import ObjectStoreError, PortInUseError

DEFAULT_REGION = "us-east-1"
IDENTITY = "prefstream"
# Raft election timeout of the single master: the default 10 s made a restart take 18.5 s, 1 s 3.6 s.
ELECTION_TIMEOUT = "1s"
# Seconds the volume server waits after leaving the master before it exits; 0 keeps `stack down` quick.
VOLUME_PRE_STOP_S = 0
# Largest volume file. With -volume.max=0 the volume server offers (free disk / this) volume slots,
# and every bucket is a collection with volumes of its own: at 1024 MB a disk with 6 GB free had 5
# slots, the first bucket took them all and PutObject into a second bucket failed with HTTP 500.
# Volumes grow on demand and are not preallocated, so a small limit costs nothing on disk.
VOLUME_SIZE_LIMIT_MB = 128
# SeaweedFS grows 7 volumes at once for a collection without replication (master.toml
# volume_growth.copy_1, read from this variable); one at a time lets the slots stretch across many
# buckets, as `weed mini` does.
GROWTH_ENV = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
# After SIGTERM weed's filer waits 15 s for the in-process S3 gateway's gRPC stream before the rest
# stops. Its files are consistent after a kill at any moment (the kill -9 tests check it), so a
# stop does not wait that long.
STOP_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ObjectStorePorts:
    """The ports `weed server` listens on: HTTP and gRPC of its S3 gateway, master, volume server and filer."""

    s3: int
    master: int
    volume: int
    filer: int
    s3_grpc: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int

    @classmethod
    def from_s3_port(cls, port: int) -> ObjectStorePorts:
        """The S3 port and the three after it; gRPC on each plus 10000 (SeaweedFS's own convention)."""
        http = [port, port + 1, port + 2, port + 3]
        grpc = [p + 10000 for p in http]
        if max(grpc) > 65535:
            raise ObjectStoreError(
                f"PREFSTREAM_OBJECT_STORE_PORT={port} is too high: the object store also uses that port + 1..3 "
                f"and each + 10000; choose a port of at most 55532"
            )
        return cls(*http, *grpc)

    @classmethod
    def free(cls) -> ObjectStorePorts:
        """Eight distinct free ports (tests, which must not collide with a running store)."""
        ports: list[int] = []
        while len(ports) < 8:
            if (port := free_port()) not in ports:
                ports.append(port)
        return cls(*ports)

    def all(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class ObjectStoreEndpoint:
    """Where and how to reach the object store over S3."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = DEFAULT_REGION

    @property
    def credentials(self) -> S3Credentials:
        return S3Credentials(self.access_key, self.secret_key, self.region)

    def client(self) -> S3Client:
        return S3Client(self.endpoint_url, self.credentials)

    def aws_env(self) -> dict[str, str]:
        """Environment for an S3 client of this store: Tansu (the Rust object_store crate reads
        AWS_ENDPOINT and AWS_ALLOW_HTTP) and AWS SDKs (AWS_ENDPOINT_URL)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ALLOW_HTTP": "true" if self.endpoint_url.startswith("http://") else "false",
        }


def create_bucket(endpoint: ObjectStoreEndpoint, bucket: str) -> bool:
    """Create ``bucket`` unless it exists; True if it was created."""
    with endpoint.client() as client:
        return client.create_bucket(bucket)


def _write_private(path: Path, text: str) -> None:
    # Created with 0600 from the start (never readable by others, not even briefly), then renamed
    # into place so a crash cannot leave half a credentials file.
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def load_or_create_credentials(config: Path) -> tuple[str, str]:
    """The (access key, secret key) of the store's identity in ``config``, generated if the file is absent."""
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        access, secret = "PS" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
        identities = {"identities": [{
            "name": IDENTITY,
            "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        _write_private(config, json.dumps(identities, indent=2) + "\n")
        return access, secret
    if config.stat().st_mode & 0o077:
        config.chmod(0o600)  # ours, holding a secret: others must not read it
    try:
        identity = next(i for i in json.loads(config.read_text())["identities"] if i.get("name") == IDENTITY)
        cred = identity["credentials"][0]
        return cred["accessKey"], cred["secretKey"]
    except (OSError, ValueError, KeyError, IndexError, StopIteration, TypeError) as exc:
        raise ObjectStoreError(
            f"{config} has no usable '{IDENTITY}' identity ({exc!r}). Restore it from a backup; deleting it "
            f"makes new keys, and the data already stored stays on disk under {config.parent}"
        ) from exc


class ObjectStore:
    """One SeaweedFS server (master, volume, filer, S3 gateway in one process) under ``home``."""

    def __init__(self, home: Path, ports: ObjectStorePorts, host: str = "127.0.0.1",
                 region: str = DEFAULT_REGION) -> None:
        self.home = Path(home).resolve()
        self.ports = ports
        self.host = host
        self.region = region
        self.data_dir = self.home / "seaweedfs"
        self.config = self.data_dir / "s3.json"
        self.process = ServerProcess("objectstore", self.home, host, ports.s3, marker="weed",
                                     port_setting="PREFSTREAM_OBJECT_STORE_PORT", stop_timeout_s=STOP_TIMEOUT_S)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    def endpoint(self) -> ObjectStoreEndpoint:
        """The endpoint with its credentials (generated on first call for a new home)."""
        access, secret = load_or_create_credentials(self.config)
        return ObjectStoreEndpoint(self.endpoint_url, access, secret, self.region)

    def answers(self) -> bool:
        """True when the S3 gateway answers a signed request with these credentials and the volume server
        has joined the master. The gateway answers about 2 s before that after a restart, and reading
        an object stored earlier fails with HTTP 500 until the master knows where its volume is."""
        if not self.config.exists():
            return False
        try:
            with S3Client(self.endpoint_url, self.endpoint().credentials, timeout=1.0) as client:
                if not client.request("GET").is_success:
                    return False
            status = httpx.get(f"http://{self.host}:{self.ports.master}/dir/status", timeout=1.0).json()
        except (ObjectStoreError, httpx.HTTPError, ValueError):
            return False
        centers = (status.get("Topology") or {}).get("DataCenters") or []
        return any(rack.get("DataNodes") for dc in centers for rack in dc.get("Racks") or [])

    def _argv(self) -> list[str]:
        p = self.ports
        return [
            str(binaries.weed()), "server",
            f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            f"-master.electionTimeout={ELECTION_TIMEOUT}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}", "-volume.max=0",
            f"-volume.preStopSeconds={VOLUME_PRE_STOP_S}",
            "-filer", f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}",
            "-s3", f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}", f"-s3.config={self.config}",
            # The Iceberg and Lance catalogs would take two more fixed ports; nothing here uses them.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def start(self) -> ObjectStoreEndpoint:
        """Start the store unless ours already runs; wait until S3 answers. Returns its endpoint."""
        endpoint = self.endpoint()
        if self.process.pid() is None:
            taken = [f"{name} {port}" for name, port in self.ports.all().items()
                     if name != "s3" and not port_frees(self.host, port)]
            if taken:
                raise PortInUseError(
                    f"objectstore: port(s) {', '.join(taken)} on {self.host} are in use by another process. The "
                    f"object store uses PREFSTREAM_OBJECT_STORE_PORT, the three ports after it and each + 10000; "
                    f"stop that process or choose another PREFSTREAM_OBJECT_STORE_PORT."
                )
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process.start(self._argv(), ready=self.answers, env={**os.environ, **GROWTH_ENV})
        return endpoint

    def stop(self) -> bool:
        """Stop the store if it runs; its data stays under ``data_dir``. True if one was stopped."""
        return self.process.stop()
