"""The model store on S3 (PREFSTREAM_MODELS_URL) against the real embedded SeaweedFS, and the role
pointers of both backends under racing writers.

A "controller" store and a "worker" store are two ModelStores on the same bucket with their own
cache directories, as on two machines: the worker resolves an announced version by name in its own
store, downloads it and verifies every sha256 before anything loads.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest

from streams.embedded.objectstore import ObjectStoreEndpoint, create_bucket
from streams.exceptions import ModelRefusedError, UntrustedModelPathError
from trainers.exceptions import CorruptArtifactError, RegistryError, StoreAccessError, UnknownVersionError
from trainers.storage.registry import ModelStore, open_store

WRITERS = 2
ROUNDS = 25  # promotions per writer in the race: 50 conditional updates of one role pointer


@pytest.fixture
def s3_env(object_store: ObjectStoreEndpoint, monkeypatch: pytest.MonkeyPatch) -> ObjectStoreEndpoint:
    """The store's credentials in the environment, where boto3 (and a worker process) read them."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in object_store.aws_env().items():
        monkeypatch.setenv(name, value)
    return object_store


@pytest.fixture
def bucket(s3_env: ObjectStoreEndpoint) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    assert create_bucket(s3_env, name)
    return name


def s3_store(endpoint: ObjectStoreEndpoint, bucket: str, cache: Path) -> ModelStore:
    return open_store(f"s3://{bucket}/prefstream/models", cache, endpoint.endpoint_url)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_decoder

    return build_tiny_decoder("qwen3", tmp_path_factory.mktemp("tiny") / "model")


def raw_object(endpoint: ObjectStoreEndpoint, bucket: str, key: str) -> bytes | None:
    with endpoint.client() as client:
        return client.get_object(bucket, f"prefstream/models/{key}")


def test_a_version_published_to_s3_loads_verified_from_another_machines_cache(s3_env, bucket, tiny_model, tmp_path):
    from streams.runtime.processors.scorer import load_announced

    controller = s3_store(s3_env, bucket, tmp_path / "controller-cache")
    worker = s3_store(s3_env, bucket, tmp_path / "worker-cache")
    v1 = controller.publish(tiny_model, "current", lineage={"pairs": 3})
    assert worker.serving("current") == v1.version and [v.version for v in worker.list()] == [v1.version]
    record = controller.version_record(v1.version, "current", "promote", "test")
    assert record["path"] == f"s3://{bucket}/prefstream/models/versions/{v1.version}/"
    record["path"] = "/etc"  # never opened: the worker resolves the name in its own store
    rm = load_announced(record, store=worker)
    rewards = rm.score_pairs([{"conversation": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}])
    assert all(len(r) == 1 for r in rewards)
    cached = tmp_path / "worker-cache" / v1.version
    for rel, meta in v1.manifest["files"].items():
        assert (cached / rel).read_bytes() == (tiny_model / rel).read_bytes(), rel
        assert meta["bytes"] == (tiny_model / rel).stat().st_size
    assert raw_object(s3_env, bucket, f"versions/{v1.version}/manifest.json") == (cached / "manifest.json").read_bytes()

    # The verified cached copy is reused: nothing is downloaded the second time.
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again although a verified copy is cached")

    worker.backend.client.download_file = no_download
    assert worker.checkout(v1.version) == cached
    # A cached file changed on disk no longer verifies: it is fetched again from the bucket.
    (cached / "config.json").write_text("{}")
    with pytest.raises(AssertionError, match="downloaded again"):
        worker.checkout(v1.version)
    del worker.backend.client.download_file
    assert worker.checkout(v1.version) == cached
    assert (cached / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()


def test_a_tampered_object_is_refused_and_the_old_model_keeps_serving(s3_env, bucket, tiny_model, tmp_path):
    from streams.runtime.processors.scorer import ModelSlot, load_announced

    controller = s3_store(s3_env, bucket, tmp_path / "controller-cache")
    worker = s3_store(s3_env, bucket, tmp_path / "worker-cache")
    slot = ModelSlot("current", lambda rec: load_announced(rec, store=worker))
    v1 = controller.publish(tiny_model, "current")
    slot.offer(controller.version_record(v1.version, "current", "promote", "test"))
    assert slot.swap_if_ready() and slot.serving.version == v1.version

    v2 = controller.publish(tiny_model, "current", promote=False)
    weights = f"prefstream/models/versions/{v2.version}/model.safetensors"
    with s3_env.client() as client:
        data = bytearray(client.get_object(bucket, weights))
        data[len(data) // 2] ^= 0xFF
        client.put_object(bucket, weights, bytes(data))
    slot.offer(controller.version_record(v2.version, "current", "promote", "test"))
    assert slot.pending is None and not slot.swap_if_ready() and slot.serving.version == v1.version
    assert "model.safetensors does not match its sha256" in slot.failures[-1]
    assert not (tmp_path / "worker-cache" / v2.version).exists(), "a copy that failed verification is not kept"
    with pytest.raises(CorruptArtifactError, match="model.safetensors"):
        controller.promote(v2.version, "current")
    assert controller.serving("current") == v1.version

    # A manifest that differs from the announcement's sha256 is refused before anything is fetched.
    v3 = controller.publish(tiny_model, "current", promote=False)
    record = controller.version_record(v3.version, "current", "promote", "test") | {"manifest_sha256": "0" * 64}
    with pytest.raises(ModelRefusedError, match="does not match the announced sha256"):
        load_announced(record, store=worker)
    assert not (tmp_path / "worker-cache" / v3.version).exists()


@pytest.mark.parametrize("version", ["current-20260101-000000-abcdef", "../../etc", "current-latest", ""])
def test_an_unknown_or_malformed_version_is_refused_and_counted(s3_env, bucket, tmp_path, version):
    from streams.runtime import metrics
    from streams.runtime.processors.scorer import load_announced

    worker = s3_store(s3_env, bucket, tmp_path / "worker-cache")
    before = metrics.ANNOUNCEMENTS_REFUSED.labels("current", "outside_store")._value.get()
    record = {"role": "current", "version": version, "path": f"s3://{bucket}/prefstream/models/versions/{version}/",
              "manifest_sha256": "0" * 64}
    with pytest.raises(UntrustedModelPathError, match="not one the model store makes|no model version"):
        load_announced(record, store=worker)
    assert metrics.ANNOUNCEMENTS_REFUSED.labels("current", "outside_store")._value.get() == before + 1
    assert not (tmp_path / "worker-cache").exists() or not any((tmp_path / "worker-cache").iterdir())


def test_a_version_without_its_manifest_does_not_exist(s3_env, bucket, tiny_model, tmp_path, monkeypatch):
    """An upload that stops before the manifest (a crash) leaves objects no reader sees."""
    store = s3_store(s3_env, bucket, tmp_path / "cache")
    client = store.backend.client
    real_put = client.put_object

    def crash_on_manifest(**kwargs):
        if kwargs["Key"].endswith("manifest.json"):
            raise OSError("simulated crash before the manifest")
        return real_put(**kwargs)

    monkeypatch.setattr(client, "put_object", crash_on_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        store.publish(tiny_model, "current")
    monkeypatch.setattr(client, "put_object", real_put)
    with s3_env.client() as raw:
        leftovers = list(raw.list_keys(bucket, "prefstream/models/versions/"))
    assert any(k.endswith("model.safetensors") for k in leftovers), "the files were uploaded before the crash"
    assert store.list() == [] and store.serving("current") is None
    half = leftovers[0].split("/")[3]
    with pytest.raises(UnknownVersionError, match="no model version"):
        store.get(half)
    assert store.publish(tiny_model, "current").version in [v.version for v in store.list()]


def test_s3_errors_say_the_fix(s3_env, bucket, tmp_path, monkeypatch):
    from streams.embedded.process import free_port

    with pytest.raises(StoreAccessError, match=r"bucket 'no-such-bucket-\w+' does not exist.*aws s3 mb"):
        s3_store(s3_env, f"no-such-bucket-{uuid.uuid4().hex[:8]}", tmp_path).check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StoreAccessError, match="refused the credentials.*AWS_SECRET_ACCESS_KEY"):
        s3_store(s3_env, bucket, tmp_path).history("current")
    nowhere = ObjectStoreEndpoint(f"http://127.0.0.1:{free_port()}", "k", "s")
    with pytest.raises(StoreAccessError, match="did not answer.*PREFSTREAM_S3_ENDPOINT"):
        s3_store(nowhere, bucket, tmp_path).check()
    with pytest.raises(RegistryError, match="s3://bucket/prefix"):
        open_store("gs://bucket/models", tmp_path)


def _tiny_versions(store: ModelStore, tmp_path: Path, n: int) -> list[str]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        (src / "config.json").write_text(json.dumps({"i": i}))
        out.append(store.publish(src, "gold", promote=False).version)
    return out


def _together(target) -> None:
    """``target(w)`` for every writer w, each in its own thread, all joined."""
    threads = [threading.Thread(target=target, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("backend", ["directory", "s3"])
def test_racing_writers_never_lose_a_role_update(backend, request, tmp_path):
    """Two controllers promote their own versions to one role at once: every promotion lands, in each
    writer's order, and rollbacks racing with promotions remove exactly one version each."""
    if backend == "s3":
        endpoint, bucket = request.getfixturevalue("s3_env"), request.getfixturevalue("bucket")
        stores = [s3_store(endpoint, bucket, tmp_path / f"cache-{w}") for w in range(WRITERS)]
    else:
        stores = [ModelStore(tmp_path / "store") for _ in range(WRITERS)]
    versions = _tiny_versions(stores[0], tmp_path, WRITERS * ROUNDS)
    mine = [versions[w::WRITERS] for w in range(WRITERS)]
    errors: list[BaseException] = []
    start = threading.Barrier(WRITERS)

    def writer(w: int) -> None:
        try:
            start.wait()
            for v in mine[w]:
                stores[w].promote(v, "gold")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    _together(writer)
    assert not errors, errors
    history = stores[0].history("gold")
    assert sorted(history) == sorted(versions), f"lost {len(versions) - len(history)} of {len(versions)} updates"
    for w in range(WRITERS):
        assert [v for v in history if v in set(mine[w])] == mine[w], "a writer's promotions landed out of order"
    raw = stores[0].backend.read("roles/gold.json")
    assert json.loads(raw)["generation"] == len(versions)

    # Rollbacks racing each other: each removes exactly one version, none is lost or applied twice.
    def roller(w: int) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS // 5):
                stores[w].rollback("gold")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    _together(roller)
    assert not errors, errors
    assert stores[1].history("gold") == history[: len(history) - WRITERS * (ROUNDS // 5)]


@pytest.mark.integration
def test_a_worker_on_the_s3_store_scores_with_the_version_a_controller_published(settings, s3_env, bucket, tmp_path):
    """Worker and publisher share no directory: the worker has only PREFSTREAM_MODELS_URL and its own cache."""
    import time

    from streams.kafka.announce import Announcer
    from streams.sdk import PreferenceProducer
    from tests.helpers import WorkerProcess, wait_for_scored
    from trainers.scoring.model import RewardModel

    url = f"s3://{bucket}/prefstream/models"
    worker_settings = settings.model_copy(update={"models_url": url, "s3_endpoint": s3_env.endpoint_url,
                                                  "models_dir": tmp_path / "worker-models",
                                                  "models_cache_dir": tmp_path / "worker-cache"})
    controller = open_store(url, tmp_path / "controller-cache", s3_env.endpoint_url)
    model_dir = RewardModel.default(max_length=64, seed=5).save(tmp_path / "candidate")
    worker = WorkerProcess(worker_settings, extra_env=s3_env.aws_env()).start()
    try:
        v1 = controller.publish(model_dir, "current", announce=Announcer(settings))
        deadline = time.monotonic() + 180
        while 'prefstream_model_swaps_total{role="current"} 1.0' not in worker.metrics():
            assert time.monotonic() < deadline, f"the worker never swapped to {v1.version}:\n{worker.log.read_text()[-3000:]}"
            time.sleep(0.5)
        pairs = [{"pair_id": f"s3-{i}", "prompt": f"Name a colour {i}.", "chosen": "Blue.", "rejected": "No."}
                 for i in range(20)]
        with PreferenceProducer(settings) as producer:
            for p in pairs:
                producer.send(p)
        records = wait_for_scored(settings, {p["pair_id"] for p in pairs}, timeout=180)
        assert {r["model_version"] for r in records if r["pair"]["pair_id"].startswith("s3-")} == {v1.version}
        assert (tmp_path / "worker-cache" / v1.version / "model.safetensors").is_file()
        assert not (tmp_path / "worker-models" / "versions").exists(), "the worker read no model directory"
    finally:
        assert worker.stop() == 0
