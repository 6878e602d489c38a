"""Deployment: k8s manifests validate against the Kubernetes schema and agree with the code; compose too.

No Docker engine or Kubernetes API server runs here: these checks are what stands in for them.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from streams.deploy import EXTERNAL_ENV, STRIMZI_TOPICS, settings_env_names, strimzi_topics_yaml
from streams.kafka.topics import BY_NAME, RAW, TOPICS
from streams.settings import WorkerSettings
from tests.helpers import ROOT

OVERLAYS = ["dev", "prod", "external-kafka", "strimzi"]
CRD_KINDS = {"Kafka", "KafkaTopic", "KafkaNodePool", "ScaledObject", "PrometheusRule"}


def render(path: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; manifests not rendered")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / path)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base"] + [f"overlays/{o}" for o in OVERLAYS])
def docs(request) -> list[dict]:
    return render(request.param)


def test_every_manifest_validates_against_kubernetes_1_30(docs):
    kv = pytest.importorskip("kubernetes_validate")
    for d in docs:
        if d["kind"] in CRD_KINDS:
            continue
        kv.validate(d, "1.30.0", strict=True)


def pod_specs(docs):
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "Job"):
            yield d, spec["template"]["spec"]
        elif d["kind"] == "CronJob":
            yield d, spec["jobTemplate"]["spec"]["template"]["spec"]


def test_no_container_runs_as_root_and_roots_are_read_only(docs):
    for d, pod in pod_specs(docs):
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, d["metadata"]["name"]
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True, c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]


def test_every_env_var_set_is_one_the_settings_read(docs):
    allowed = settings_env_names() | EXTERNAL_ENV
    for d in docs:
        # The dashboard's ConfigMap holds a file for Grafana, not environment variables.
        if d["kind"] == "ConfigMap" and "grafana_dashboard" not in d["metadata"].get("labels", {}):
            assert set(d["data"]) <= allowed, set(d["data"]) - allowed
    for _, pod in pod_specs(docs):
        for c in pod["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            assert names <= allowed, names - allowed


def test_role_grants_only_jobs_and_pod_logs(docs):
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"], "no ClusterRole: the controller stays in its namespace"
    for rule in roles[0]["rules"]:
        for res in rule["resources"]:
            assert res in {"jobs", "jobs/status", "pods", "pods/log"}, res
            if res.startswith("pods"):
                assert set(rule["verbs"]) <= {"get", "list"}, rule
            else:
                assert set(rule["verbs"]) <= {"create", "get", "list", "watch", "delete"}, rule


def test_autoscaling_never_exceeds_the_partition_count(docs):
    partitions = BY_NAME[RAW].partitions
    for d in docs:
        if d["kind"] == "HorizontalPodAutoscaler":
            assert d["spec"]["maxReplicas"] <= partitions
        if d["kind"] == "ScaledObject":
            assert d["spec"]["maxReplicaCount"] <= partitions
            trig = d["spec"]["triggers"][0]
            assert trig["type"] == "kafka" and d["spec"]["scaleTargetRef"]["name"] == "prefstream-worker"
            assert trig["metadata"]["topic"] == RAW and trig["metadata"]["consumerGroup"] == WorkerSettings().group


def test_probes_hit_the_services_endpoints(docs):
    ready = {"prefstream-worker": "/readyz", "prefstream-controller": "/readyz", "prefstream-review": "/healthz"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == set(ready)
    for name, d in deployments.items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == ready[name]


def test_review_is_exposed_through_service_and_ingress(docs):
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "prefstream-review")
    ing = next(d for d in docs if d["kind"] == "Ingress")
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == svc["metadata"]["name"]


def test_strimzi_topics_match_the_code_table():
    assert STRIMZI_TOPICS.read_text() == strimzi_topics_yaml(), "run `python -m streams.deploy` to regenerate"
    docs = render("overlays/strimzi")
    topics = {d["spec"]["topicName"]: d for d in docs if d["kind"] == "KafkaTopic"}
    assert set(topics) == {t.name for t in TOPICS}
    for t in TOPICS:
        spec = topics[t.name]["spec"]
        assert spec["partitions"] == t.partitions and spec.get("config", {}) == t.config
        assert topics[t.name]["metadata"]["labels"]["strimzi.io/cluster"] == "prefstream-kafka"
    kafka = next(d for d in docs if d["kind"] == "Kafka")
    assert kafka["spec"]["kafka"]["listeners"] and kafka["spec"]["entityOperator"]["topicOperator"] is not None
    assert not [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "prefstream-topics"]


def test_compose_parses_and_references_only_what_exists():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services, volumes = compose["services"], set(compose["volumes"])
    allowed = settings_env_names() | EXTERNAL_ENV | {k for k in str(services["kafka"]["environment"]).split("'") if k.startswith("KAFKA_")}
    for name, svc in services.items():
        assert "image" in svc, name
        assert "healthcheck" in svc and "restart" in svc, name
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            assert src in volumes, f"{name} mounts unknown volume {src}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        if name not in ("kafka", "redis"):
            assert set(svc.get("environment", {})) <= allowed, set(svc["environment"]) - allowed
    assert services["review"]["ports"] == ["8080:8080"]
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert "--appendonly" in services["redis"]["command"]
    assert services["topics"]["command"] == ["topics", "create"]


def test_dockerfile_runs_prefstream_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and 'ENTRYPOINT ["prefstream"]' in text and "torch==2.13.0" in text
