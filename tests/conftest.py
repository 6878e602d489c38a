"""Session fixtures: one real embedded stack (Tansu + Redis) and one object store (SeaweedFS) per session.

Each test that needs topics gets its own uuid topic prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.embedded.objectstore import ObjectStore, ObjectStoreEndpoint, ObjectStorePorts, create_bucket
from streams.embedded.process import free_port
from streams.embedded.stack import Stack
from streams.kafka.admin import ensure_topics
from streams.settings import Settings


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of the session's embedded stack, on free ports so a user's own stack is not disturbed."""
    home = tmp_path_factory.mktemp("prefstream-home")
    return Settings(
        bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        home=home,
    )


@pytest.fixture(scope="session")
def stack(stack_settings: Settings):
    st = Stack(stack_settings)
    st.up()
    yield st
    import gc

    gc.collect()  # drop tests' idle Kafka clients first, so they do not log the broker going away
    st.down()
    assert st.broker.pid() is None and st.redis.pid() is None, "the test stack left a server running"


@pytest.fixture(scope="session")
def kafka_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Apache Kafka KRaft broker (and its own Redis) for the session, through the same Stack as
    `prefstream stack up --engine kafka`; the jars come from PREFSTREAM_KAFKA_CACHE (fetched once)."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the Apache Kafka tests need {' and '.join(missing)} on PATH "
                    "(apt-get install openjdk-17-jre-headless maven); the embedded Tansu tests still run")
    home = tmp_path_factory.mktemp("kafka-home")
    st = Stack(Settings(engine="kafka", bootstrap=f"127.0.0.1:{free_port()}",
                        redis_url=f"redis://127.0.0.1:{free_port()}/0", home=home))
    try:
        st.up()
        yield st
    finally:
        import gc

        gc.collect()
        st.down()
    assert all(b.pid() is None for b in st.brokers), "the Kafka test stack left a broker running"


@pytest.fixture
def kafka_settings(kafka_stack: Stack, tmp_path: Path) -> Settings:
    """Like ``settings``, on the session's Apache Kafka broker."""
    s = kafka_stack.settings.model_copy(update={"topic_prefix": f"k{uuid.uuid4().hex[:10]}.",
                                                "models_dir": tmp_path / "models", "shards_dir": tmp_path / "shards"})
    ensure_topics(s)
    return s


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStoreEndpoint]:
    """One real SeaweedFS (S3 gateway) for the session, in its own home on free ports. Tests share it:
    each should use its own bucket (``create_bucket(object_store, name)``) or key prefix."""
    store = ObjectStore(tmp_path_factory.mktemp("objectstore-home"), ObjectStorePorts.free())
    try:
        yield store.start()
    finally:
        store.stop()
    assert store.process.pid() is None, "the test object store left a server running"


@pytest.fixture(scope="session")
def shards_bucket(object_store: ObjectStoreEndpoint) -> str:
    """One bucket for the session's shard tests, a prefix per test: SeaweedFS gives every bucket its own
    volumes, and the session's store has room for only a few buckets' worth."""
    name = f"shards-{uuid.uuid4().hex[:12]}"
    assert create_bucket(object_store, name)
    return name


@pytest.fixture
def shards_url(object_store: ObjectStoreEndpoint, shards_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh shards prefix, with the store's credentials where boto3 reads them."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in object_store.aws_env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{shards_bucket}/{uuid.uuid4().hex[:8]}/shards"


@pytest.fixture
def settings(stack: Stack, stack_settings: Settings, tmp_path: Path) -> Settings:
    """Settings with a fresh topic prefix (topics created) and private model and shard dirs."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    s = stack_settings.model_copy(update={"topic_prefix": prefix, "models_dir": tmp_path / "models",
                                          "shards_dir": tmp_path / "shards"})
    ensure_topics(s)
    return s


@pytest.fixture
def agg(stack: Stack, stack_settings: Settings):
    """An Aggregator on the session's Redis under a fresh key prefix: (aggregator, redis client, prefix)."""
    import time

    import redis

    from streams.review.aggregator import Aggregator

    r = redis.Redis.from_url(stack_settings.redis_url)
    prefix = f"agg{time.monotonic_ns()}."
    return Aggregator(r, prefix), r, prefix


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser():
    """Headless Chromium (Debian's) through playwright."""
    import shutil

    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--no-first-run"])
        yield b
        b.close()


def pytest_configure(config: pytest.Config) -> None:
    # Tests never reach a model hub; transformers must load from local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
