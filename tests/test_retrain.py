"""Continuous learning: the retrain job and its gate, job runners, and the controller closing the loop."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streams.runtime.jobs import JobTemplate, KubernetesRunner, LocalRunner, job_manifest, kube_client
from tests.helpers import (
    FAST_RETRAIN,
    ROOT,
    WorkerProcess,
    json_lines,
    produce,
    run_cli,
    settings_env,
    swapped,
    toy_pairs,
    wait_for_scored,
    write_shard,
)
from trainers.retrain import RetrainConfig, gate, run_retrain, run_seed
from trainers.storage.registry import ModelStore


def test_gate_rules():
    cfg = RetrainConfig(tolerance=0.02, max_category_drop=0.1, min_category_pairs=5)
    serv = {"accuracy": 0.8, "n": 100, "by_category": {"math": {"accuracy": 0.9, "n": 50}, "chat": {"accuracy": 0.7, "n": 3}}}
    ok, _ = gate({"accuracy": 0.79, "n": 100, "by_category": {"math": {"accuracy": 0.85, "n": 50}}}, serv, cfg)
    assert ok
    ok, why = gate({"accuracy": 0.7, "n": 100, "by_category": {}}, serv, cfg)
    assert not ok and "below the serving model" in why
    ok, why = gate({"accuracy": 0.85, "n": 100, "by_category": {"math": {"accuracy": 0.7, "n": 50},
                                                               "chat": {"accuracy": 0.0, "n": 3}}}, serv, cfg)
    assert not ok and "category math" in why  # chat has too few pairs to be gated on its own


def test_seed_then_a_worse_model_fails_the_gate(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "extra"}) for p in toy_pairs(80)))
    models, shards = tmp_path / "models", tmp_path / "shards"
    announced = []
    results = run_seed(RetrainConfig(seed_file=str(seed), models_dir=str(models), shards_dir=str(shards), **FAST_RETRAIN),
                       announced.append)
    assert [r.decision for r in results] == ["published", "published"], [r.reason for r in results]
    store = ModelStore(models)
    v1 = store.serving("current")
    assert v1 and store.serving("gold") and [a["role"] for a in announced] == ["gold", "current"]
    assert store.get(v1).manifest["lineage"]["seed_pairs"] == 80
    assert (store.get(v1).path / "model.onnx").exists()
    # Stage 1 trains once: current is the gold model's weights published again under its own version.
    weights = [store.get(store.serving(r)).manifest["files"]["model.safetensors"]["sha256"] for r in ("gold", "current")]
    assert weights[0] == weights[1] and store.serving("gold") != v1

    # The fixed regression set says chosen is right; the new shards teach the opposite: the candidate must fail.
    regression = tmp_path / "regression.jsonl"
    regression.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "extra"}) for p in toy_pairs(60, seed=11)))
    write_shard(shards, "silver", swapped(toy_pairs(160, seed=12)))
    res = run_retrain(RetrainConfig(models_dir=str(models), shards_dir=str(shards), replay_fraction=0.0,
                                    regression_file=str(regression), **(FAST_RETRAIN | {"max_steps": 30, "learning_rate": 3e-4})),
                      announced.append)
    assert res.decision == "gate_failed", res.reason
    assert "below the serving model" in res.reason or "drops" in res.reason
    assert store.serving("current") == v1 and len(announced) == 2, "a failed gate must not publish or announce"


def test_too_little_data_is_skipped(tmp_path):
    res = run_retrain(RetrainConfig(models_dir=str(tmp_path / "m"), shards_dir=str(tmp_path / "s"), **FAST_RETRAIN))
    assert res.decision == "skipped" and "min_pairs" in res.reason


def test_retrain_cli_prints_a_result_line_the_runner_reads(tmp_path, stack_settings):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "extra"}) for p in toy_pairs(40)))
    env = settings_env(stack_settings.model_copy(update={"models_dir": tmp_path / "models", "shards_dir": tmp_path / "shards"}))
    runner = LocalRunner(tmp_path / "logs", env=env)
    handle = runner.submit("current", {}, ["--seed-file", str(seed), "--max-steps", "4", "--max-length", "48",
                                           "--no-quantize", "--no-announce", "--tolerance", "1"])
    deadline = time.monotonic() + 300
    while not handle.done():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    outcome = handle.outcome()
    assert outcome.succeeded, handle.log.read_text()[-2000:]
    assert [r["decision"] for r in outcome.result] == ["published", "published"]
    assert "training step 4/4 loss" in handle.log.read_text()  # the job's log shows its progress


# ---------------------------------------------------------------------------- Kubernetes
def test_job_manifest_validates_against_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate")
    job = job_manifest("prefstream-retrain-current-1", "current", {"prefstream.io/data-pairs": "500"}, JobTemplate())
    kv.validate(job, "1.30.0", strict=True)
    spec = job["spec"]
    assert spec["backoffLimit"] == 1 and spec["ttlSecondsAfterFinished"] == 3600
    pod = spec["template"]["spec"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} == \
        {"prefstream-shards", "prefstream-models"}
    assert pod["containers"][0]["resources"]["limits"]["memory"] == "8Gi"
    # No API access, Pod Security `restricted`, the Kafka credentials to announce the new version with (the
    # retrain Secret's SASL keys; protocol and mechanism come from the ConfigMap) and the key that signs the
    # announcement (required: a worker refuses an unsigned one).
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = pod["containers"][0]
    assert c["envFrom"] == [{"configMapRef": {"name": "prefstream-config"}}]
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert secret_env == {k: {"name": "prefstream-retrain", "key": k, "optional": True}
                          for k in ("PREFSTREAM_SASL_USERNAME", "PREFSTREAM_SASL_PASSWORD")} | {
        "PREFSTREAM_ANNOUNCE_SIGNING_KEY": {"name": "prefstream-retrain", "key": "PREFSTREAM_ANNOUNCE_SIGNING_KEY"}}
    other = job_manifest("j", "gold", {}, JobTemplate(secret="kafka-retrain"))["spec"]["template"]["spec"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in other["containers"][0]["env"] if "valueFrom" in e} == \
        {"kafka-retrain"}
    bad = json.loads(json.dumps(job))
    bad["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.30.0", strict=True)


class FakeKubeAPI(BaseHTTPRequestHandler):
    """Answers like the Kubernetes API for the endpoints the runner uses (create, watch, status, pods, logs)."""

    jobs: dict[str, dict] = {}
    created: list[dict] = []

    def _send(self, code: int, body: object, ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/apis/batch/v1/namespaces/prefstream/jobs":
            return self._send(404, {"kind": "Status", "code": 404})
        body["status"] = {}
        type(self).jobs[body["metadata"]["name"]] = body
        type(self).created.append(body)
        self._send(201, body)

    def do_GET(self) -> None:  # noqa: N802
        path, _, query = self.path.partition("?")
        if path == "/apis/batch/v1/namespaces/prefstream/jobs" and "watch=true" in query:
            name = query.split("metadata.name%3D")[1].split("&")[0]
            job = type(self).jobs[name]
            running = json.loads(json.dumps(job)) | {"status": {"active": 1}}
            done = json.loads(json.dumps(job)) | {"status": {"succeeded": 1}}
            events = "".join(json.dumps({"type": "MODIFIED", "object": o}) + "\n" for o in (running, done))
            return self._send(200, events)
        if path.startswith("/apis/batch/v1/namespaces/prefstream/jobs/") and path.endswith("/status"):
            job = type(self).jobs[path.split("/")[-2]]
            return self._send(200, json.loads(json.dumps(job)) | {"status": {"succeeded": 1}})
        if path == "/api/v1/namespaces/prefstream/pods":
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                    "items": [{"metadata": {"name": "retrain-pod-1"}}]})
        if path == "/api/v1/namespaces/prefstream/pods/retrain-pod-1/log":
            return self._send(200, 'training...\nRETRAIN_RESULT {"decision": "published", "version": "current-x"}\n',
                              "text/plain")
        self._send(404, {"kind": "Status", "code": 404})

    def log_message(self, *a: object) -> None:
        pass


def test_kubernetes_runner_creates_watches_and_reads_the_outcome():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = kube_client(host=f"http://127.0.0.1:{server.server_port}")
        runner = KubernetesRunner(JobTemplate(), api_client=api)
        handle = runner.submit("gold", {"prefstream.io/data-pairs": "120"}, ["--max-steps", "100"])
        created = FakeKubeAPI.created[-1]
        assert created["metadata"]["labels"]["prefstream.io/role"] == "gold"
        assert created["spec"]["template"]["spec"]["containers"][0]["args"] == ["retrain", "--role", "gold", "--max-steps", "100"]
        assert handle.done()
        outcome = handle.outcome()
        assert outcome.succeeded and outcome.result == {"decision": "published", "version": "current-x"}
    finally:
        server.shutdown()


def test_kube_client_without_credentials_says_what_to_do(tmp_path, monkeypatch):
    from streams.runtime.jobs import JobError

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(JobError, match="kubeconfig"):
        kube_client(kubeconfig=str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- the whole loop
def wait_until_served(settings, version: str, tag: str, failure: str, timeout: float = 120) -> None:
    """Keep sending small batches until every pair of one batch is scored by ``version``."""

    deadline = time.monotonic() + timeout
    while True:
        stamp = time.monotonic_ns()  # in the prompt too: a resent pair under a new id would be a duplicate
        batch = [{"pair_id": f"{tag}-{stamp}-{i}", "prompt": f"What is {i} * 7? (batch {stamp})", "chosen": f"{i * 7}",
                  "rejected": f"{i * 7 + 1}"} for i in range(5)]
        ids = {p["pair_id"] for p in batch}
        produce(settings, batch)
        if {r["model_version"] for r in wait_for_scored(settings, ids) if r["pair"]["pair_id"] in ids} == {version}:
            return
        assert time.monotonic() < deadline, failure


@pytest.mark.integration
def test_controller_retrains_gates_publishes_and_scorers_swap_then_rollback(settings, tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "extra"}) for p in toy_pairs(60)))
    run_cli(["retrain", "--seed-file", str(seed), "--max-steps", "8", "--max-length", "64", "--no-quantize",
             "--tolerance", "1", "--max-category-drop", "1"], settings, timeout=600)
    store = ModelStore(settings.models_dir)
    v1 = store.serving("current")
    assert v1
    worker = WorkerProcess(settings).start()
    env = settings_env(settings) | {
        "PREFSTREAM_CONTROLLER_THRESHOLD_CURRENT": "40", "PREFSTREAM_CONTROLLER_THRESHOLD_GOLD": "100000",
        "PREFSTREAM_CONTROLLER_POLL_S": "1", "PREFSTREAM_CONTROLLER_HEALTH_PORT": "0",
        # The gate is proven by the worse-model test; here a 6-step model must pass it whatever its luck.
        "PREFSTREAM_CONTROLLER_RETRAIN_ARGS": "--max-steps 6 --max-length 64 --no-quantize --tolerance 1 "
                                              "--max-category-drop 1 --min-pairs 20"}
    log = tmp_path / "controller.log"
    ctl = subprocess.Popen([sys.executable, "-m", "streams.cli", "controller"], env=env, cwd=ROOT,
                           stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        from tests.helpers import objective_pairs

        first = objective_pairs(60, seed=21)
        produce(settings, first)
        before = wait_for_scored(settings, {p["pair_id"] for p in first})
        assert {r["model_version"] for r in before} == {v1}  # the seed version serves (loaded at start)
        decisions_file = settings.models_dir / "controller-decisions.jsonl"

        def decisions() -> list[dict]:
            return [json.loads(line) for line in decisions_file.read_text().splitlines()] if decisions_file.exists() else []

        deadline = time.monotonic() + 420
        while not any(d["decision"] == "published" for d in decisions()):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert ctl.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        v2 = store.serving("current")
        assert v2 != v1
        decisions = decisions()
        assert [d["decision"] for d in decisions if d["role"] == "current"][:2] == ["triggered", "published"]
        assert decisions[0]["reason"].startswith("threshold")
        # Without a restart the worker switches to v2, and nothing is lost.
        wait_until_served(settings, v2, "after", "the worker never served the retrained version")
        # Rollback: the previous version serves again.
        run_cli(["models", "rollback", "--role", "current"], settings)
        wait_until_served(settings, v1, "rb", "the worker never swapped back after the rollback")
        versions = json_lines(run_cli(["consume", "models.versions", "--timeout", "3"], settings).stdout)
        assert [(v["version"], v["action"]) for v in versions if v["role"] == "current"][-2:] == [(v2, "promote"), (v1, "rollback")]
    finally:
        ctl.terminate()
        ctl.wait(30)
        worker.stop()
