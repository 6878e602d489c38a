"""Session fixtures: one real embedded stack (Tansu + Redis) and one object store (SeaweedFS) per session.

Each test that needs topics gets its own uuid topic prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.embedded.objectstore import ObjectStore, ObjectStoreEndpoint, ObjectStorePorts
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
        models_dir=home / "models",
        shards_dir=home / "shards",
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
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStoreEndpoint]:
    """One real SeaweedFS (S3 gateway) for the session, in its own home on free ports. Tests share it:
    each should use its own bucket (``create_bucket(object_store, name)``) or key prefix."""
    store = ObjectStore(tmp_path_factory.mktemp("objectstore-home"), ObjectStorePorts.free())
    try:
        yield store.start()
    finally:
        store.stop()
    assert store.process.pid() is None, "the test object store left a server running"


@pytest.fixture
def settings(stack: Stack, stack_settings: Settings, tmp_path: Path) -> Settings:
    """Settings with a fresh topic prefix (topics created) and private model and shard dirs."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    s = stack_settings.model_copy(update={"topic_prefix": prefix, "models_dir": tmp_path / "models",
                                          "shards_dir": tmp_path / "shards"})
    ensure_topics(s)
    return s


def pytest_configure(config: pytest.Config) -> None:
    # Tests never reach a model hub; transformers must load from local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
