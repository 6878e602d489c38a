"""The embedded object store (real SeaweedFS): credentials, buckets, objects, restart, errors."""

from __future__ import annotations

import json
import socket
import stat
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from streams.embedded.objectstore import (
    ObjectStore,
    ObjectStoreEndpoint,
    ObjectStorePorts,
    create_bucket,
    load_or_create_credentials,
)
from streams.embedded.s3 import S3Client, S3Credentials, sign
from streams.exceptions import ObjectStoreError, PortInUseError

pytestmark = pytest.mark.integration


def _bucket() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def test_credentials_are_generated_private_and_reused(tmp_path):
    config = tmp_path / "seaweedfs" / "s3.json"
    first = load_or_create_credentials(config)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert load_or_create_credentials(config) == first
    assert load_or_create_credentials(tmp_path / "other" / "s3.json") != first, "keys must be random per home"
    identity = json.loads(config.read_text())["identities"][0]
    assert "Admin" in identity["actions"]
    config.chmod(0o644)
    load_or_create_credentials(config)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_broken_credentials_file_says_what_to_do(tmp_path):
    config = tmp_path / "s3.json"
    config.write_text("{}")
    with pytest.raises(ObjectStoreError, match="Restore it from a backup"):
        load_or_create_credentials(config)


def test_signature_matches_the_aws_documented_example():
    # AWS's Signature Version 4 example for S3 "GET Bucket (List Objects)": its published signature.
    creds = S3Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    when = datetime(2013, 5, 24, tzinfo=UTC)
    headers = sign("GET", "https://examplebucket.s3.amazonaws.com/?prefix=J&max-keys=2", creds, now=when)
    assert headers["Authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
    assert "Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request" in headers["Authorization"]


def test_buckets_and_objects_round_trip(object_store: ObjectStoreEndpoint):
    bucket = _bucket()
    assert create_bucket(object_store, bucket) is True
    assert create_bucket(object_store, bucket) is False, "creating an existing bucket is a no-op"
    with object_store.client() as s3:
        assert bucket in s3.list_buckets()
        key = "models/v 1/weights+meta.json"  # spaces and plus signs must survive signing
        s3.put_object(bucket, key, b'{"a": 1}')
        s3.put_object(bucket, "models/v2/x", b"")
        assert s3.get_object(bucket, key) == b'{"a": 1}'
        assert s3.get_object(bucket, "models/absent") is None
        assert sorted(s3.list_keys(bucket, "models/")) == sorted([key, "models/v2/x"])
        s3.delete_object(bucket, key)
        s3.delete_object(bucket, key)  # deleting twice is safe
        assert list(s3.list_keys(bucket, "models/v ")) == []


def test_wrong_secret_is_refused_with_a_hint(object_store: ObjectStoreEndpoint):
    with S3Client(object_store.endpoint_url, S3Credentials(object_store.access_key, "wrong")) as s3, \
            pytest.raises(ObjectStoreError, match="HTTP 403 .*SignatureDoesNotMatch.*check the access key and secret"):
        s3.list_buckets()


def test_aws_env_names_what_tansu_reads(object_store: ObjectStoreEndpoint):
    env = object_store.aws_env()
    assert env["AWS_ENDPOINT"] == object_store.endpoint_url and env["AWS_ALLOW_HTTP"] == "true"
    assert env["AWS_ACCESS_KEY_ID"] == object_store.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == object_store.secret_key
    assert object_store.secret_key not in repr(object_store)


def test_restart_keeps_data_and_keys(tmp_path):
    store = ObjectStore(tmp_path, ObjectStorePorts.free())
    try:
        endpoint = store.start()
        assert store.start() == endpoint, "a second start reuses the running store"
        bucket = _bucket()
        create_bucket(endpoint, bucket)
        with endpoint.client() as s3:
            s3.put_object(bucket, "k", b"kept")
        assert store.stop() is True
        assert not store.answers()
        assert store.start() == endpoint
        with endpoint.client() as s3:
            assert s3.get_object(bucket, "k") == b"kept"
    finally:
        store.stop()
    assert store.process.pid() is None and store.stop() is False


def test_each_bucket_grows_one_volume_so_many_buckets_fit_a_small_disk(tmp_path):
    """Every bucket is a SeaweedFS collection with volumes of its own; growing seven at a time (the
    default) used all slots of a disk with 6 GB free on the first bucket, and the next PutObject
    failed with HTTP 500."""
    store = ObjectStore(tmp_path, ObjectStorePorts.free())
    try:
        endpoint = store.start()
        buckets = [_bucket() for _ in range(3)]
        with endpoint.client() as s3:
            for bucket in buckets:
                create_bucket(endpoint, bucket)
                s3.put_object(bucket, "k", b"v")
        status = httpx.get(f"http://127.0.0.1:{store.ports.master}/dir/status", timeout=5).json()["Topology"]
        volumes = sum(node["Volumes"] for dc in status["DataCenters"] for rack in dc["Racks"]
                      for node in rack["DataNodes"])
        assert volumes == len(buckets), status
    finally:
        store.stop()


def test_taken_internal_port_names_the_setting(tmp_path):
    ports = ObjectStorePorts.free()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.filer))
        squatter.listen()
        with pytest.raises(PortInUseError, match=f"filer {ports.filer}.*PREFSTREAM_OBJECT_STORE_PORT"):
            ObjectStore(tmp_path, ports).start()


def test_ports_from_a_base_port():
    ports = ObjectStorePorts.from_s3_port(9000)
    assert (ports.s3, ports.filer, ports.filer_grpc) == (9000, 9003, 19003)
    with pytest.raises(ObjectStoreError, match="at most 55532"):
        ObjectStorePorts.from_s3_port(60000)
