"""Model store: atomic publish, list, verify, promote, rollback, announcements on models.versions."""

from __future__ import annotations

import os

import pytest

from tests.helpers import json_lines, run_cli
from trainers.exceptions import CorruptArtifactError, RegistryError
from trainers.storage.registry import ModelStore


@pytest.fixture
def model_dir(tmp_path):
    """A small but real model directory (the packaged MiniLM saved with a scalar head)."""
    from trainers.scoring.model import RewardModel

    return RewardModel.default(max_length=64).save(tmp_path / "src")


def test_publish_list_and_rollback(tmp_path, model_dir):
    store = ModelStore(tmp_path / "store")
    announced = []
    v1 = store.publish(model_dir, "current", lineage={"shards": ["a.avro"], "pairs": 10}, announce=announced.append)
    v2 = store.publish(model_dir, "current", parent=v1.version, announce=announced.append)
    assert [v.version for v in store.list()] == [v1.version, v2.version]
    assert store.serving("current") == v2.version
    assert v1.manifest["lineage"]["pairs"] == 10 and v2.manifest["parent"] == v1.version
    assert {"model.safetensors", "config.json"} <= set(v1.manifest["files"])
    rec = store.rollback("current", announce=announced.append)
    assert rec["version"] == v1.version and rec["action"] == "rollback"
    assert store.serving("current") == v1.version
    assert [a["version"] for a in announced] == [v1.version, v2.version, v1.version]
    assert announced[0]["manifest_sha256"] == store.manifest_sha256(v1.version)
    with pytest.raises(RegistryError, match="nothing to roll back"):
        store.rollback("current")


def test_corrupted_file_is_refused(tmp_path, model_dir):
    store = ModelStore(tmp_path / "store")
    v1 = store.publish(model_dir, "gold")
    weights = v1.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="model.safetensors"):
        store.verify(v1.version)
    with pytest.raises(CorruptArtifactError):
        store.promote(v1.version, "gold")
    (v1.path / "config.json").unlink()
    with pytest.raises(CorruptArtifactError, match="missing"):
        store.verify(v1.version)


def test_half_written_version_is_never_visible(tmp_path, model_dir, monkeypatch):
    store = ModelStore(tmp_path / "store")
    real_rename = os.rename

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.publish(model_dir, "current")
    monkeypatch.setattr(os, "rename", real_rename)
    assert store.list() == [] and store.serving("current") is None
    assert any(store.backend.tmp_dir.iterdir()), "the staging copy should be left in .tmp, out of sight"
    store.publish(model_dir, "current")
    assert len(store.list()) == 1


def test_unknown_role_and_version(tmp_path, model_dir):
    store = ModelStore(tmp_path / "store")
    with pytest.raises(RegistryError, match="role"):
        store.publish(model_dir, "silver")
    with pytest.raises(RegistryError, match="no model version"):
        store.get("nope")


@pytest.mark.integration
def test_cli_publish_and_rollback_announce_on_models_versions(settings, model_dir):
    v1 = run_cli(["models", "publish", str(model_dir), "--role", "current"], settings).stdout.strip()
    v2 = run_cli(["models", "publish", str(model_dir), "--role", "current", "--parent", v1], settings).stdout.strip()
    listing = json_lines(run_cli(["models", "list", "--json"], settings).stdout)
    assert [(v["version"], v["serving"]) for v in listing] == [(v1, False), (v2, True)]
    assert v2 in run_cli(["models", "list"], settings).stdout
    run_cli(["models", "rollback", "--role", "current"], settings)
    records = json_lines(run_cli(["consume", "models.versions", "--timeout", "3"], settings).stdout)
    assert [(r["version"], r["action"]) for r in records] == [(v1, "promote"), (v2, "promote"), (v1, "rollback")]
    shown = run_cli(["models", "show", v1], settings).stdout
    assert '"role": "current"' in shown


def test_announced_version_serves_the_fastest_checked_artifact(tmp_path, model_dir):
    """auto: the INT8 ONNX when its export check let it exist, else the fp32 ONNX, else torch."""
    from streams.runtime.processors.scorer import load_announced
    from tests.helpers import toy_pairs
    from trainers.export.onnx import export
    from trainers.scoring.model import OnnxBackend, TorchBackend

    store = ModelStore(tmp_path / "store")
    plain = store.publish(model_dir, "current")
    export(model_dir, toy_pairs(20), quantize=False)
    with_onnx = store.publish(model_dir, "current")
    picked = {}
    for info in (plain, with_onnx):
        rm = load_announced(store.version_record(info.version, "current", "promote", "test"))
        picked[info.version] = (type(rm.backend), getattr(rm.backend, "path", None))
    assert picked[plain.version][0] is TorchBackend
    assert picked[with_onnx.version][0] is OnnxBackend and picked[with_onnx.version][1].name == "model.onnx"
