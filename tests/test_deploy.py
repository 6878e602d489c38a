"""Deployment: k8s manifests validate against the Kubernetes schema and agree with the code; compose too.

No Docker engine or Kubernetes API server runs here: these checks are what stands in for them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from streams.deploy import (
    EXTERNAL_ENV,
    STRIMZI_TOPICS,
    deployed_partitions,
    generated_files,
    settings_env_names,
    strimzi_topics_yaml,
)
from streams.exceptions import JobError
from streams.kafka.topics import ANNOTATIONS, MODEL_VERSIONS, RAW, SCORED, TOPICS
from streams.runtime.jobs import JobTemplate, job_manifest
from streams.settings import Settings, WorkerSettings
from tests.helpers import ROOT

OVERLAYS = ["dev", "prod", "external-kafka", "strimzi", "gpu", "s3"]
CRD_KINDS = {"Kafka", "KafkaTopic", "KafkaUser", "KafkaNodePool", "ScaledObject", "PrometheusRule"}


def render(path: str | os.PathLike) -> list[dict]:
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
    partitions = deployed_partitions()
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


def ingress_routes(ingress: dict, path: str) -> bool:
    """Whether ``path`` reaches a backend, by the Ingress path rules (Exact; Prefix by path elements)."""
    for rule in ingress["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            if p["pathType"] == "Exact" and path == p["path"]:
                return True
            if p["pathType"] == "Prefix":
                prefix = p["path"].rstrip("/")
                if path == prefix or path.startswith(prefix + "/"):
                    return True
    return False


def test_review_is_exposed_through_service_and_ingress(docs):
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "prefstream-review")
    ing = next(d for d in docs if d["kind"] == "Ingress")
    paths = [p for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]]
    assert {p["backend"]["service"]["name"] for p in paths} == {svc["metadata"]["name"]}
    # Only the annotator pages and their API: not the metrics, the API docs or the health check.
    for path in ("/", "/annotate", "/expert", "/stats", "/api/tasks/next", "/api/tasks/0a1b/verdict",
                 "/api/tasks/0a1b/judge", "/api/stats"):
        assert ingress_routes(ing, path), path
    for path in ("/metrics", "/docs", "/openapi.json", "/redoc", "/healthz", "/docs/oauth2-redirect", "/api",
                 "/metrics/", "/stats/x", "/api/statsx"):
        assert not ingress_routes(ing, path), path


def test_strimzi_topics_match_the_code_table():
    partitions = deployed_partitions()
    assert STRIMZI_TOPICS.read_text() == strimzi_topics_yaml(partitions), "run `python -m streams.deploy` to regenerate"
    docs = render("overlays/strimzi")
    topics = {d["spec"]["topicName"]: d for d in docs if d["kind"] == "KafkaTopic"}
    assert set(topics) == {t.name for t in TOPICS}
    for t in TOPICS:
        spec = topics[t.name]["spec"]
        assert spec["partitions"] == t.partitions_in(Settings(partitions=partitions))
        assert spec.get("config", {}) == t.config
        assert topics[t.name]["metadata"]["labels"]["strimzi.io/cluster"] == "prefstream-kafka"
    kafka = next(d for d in docs if d["kind"] == "Kafka")
    assert kafka["spec"]["kafka"]["listeners"] and kafka["spec"]["entityOperator"]["topicOperator"] is not None
    assert not [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "prefstream-topics"]


def _partition_counts(overlay: str) -> dict[str, int]:
    """Every place a rendered overlay carries the partition count of prefs.raw."""
    counts = {}
    for d in render(overlay):
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prefstream-config":
            counts["configmap"] = int(d["data"]["PREFSTREAM_PARTITIONS"])
        elif d["kind"] == "HorizontalPodAutoscaler":
            counts["hpa"] = d["spec"]["maxReplicas"]
        elif d["kind"] == "ScaledObject":
            counts["keda"] = d["spec"]["maxReplicaCount"]
        elif d["kind"] == "KafkaTopic" and d["spec"]["topicName"] == RAW:
            counts["kafkatopic"] = d["spec"]["partitions"]
    return counts


def test_one_partition_count_drives_every_manifest(tmp_path):
    partitions = deployed_partitions()
    stale = [str(p.relative_to(ROOT)) for p, text in generated_files(partitions).items() if p.read_text() != text]
    assert not stale, f"{stale} drifted from PREFSTREAM_PARTITIONS={partitions}: run `python -m streams.deploy`"
    assert _partition_counts("base") == {"configmap": partitions, "hpa": partitions}
    assert _partition_counts("overlays/prod") == {"configmap": partitions, "keda": partitions}
    assert _partition_counts("overlays/strimzi") == {"configmap": partitions, "hpa": partitions,
                                                     "kafkatopic": partitions}
    # Another value changes every one of them: generated into a copy of k8s/, rendered there.
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    for path, text in generated_files(partitions * 2).items():
        (copy / path.relative_to(ROOT / "k8s")).write_text(text)
    for overlay, places in (("base", 2), ("overlays/prod", 2), ("overlays/strimzi", 3)):
        counts = _partition_counts(str(copy / overlay))
        assert len(counts) == places and set(counts.values()) == {partitions * 2}, (overlay, counts)
    # The topics Job grows topics where the broker can add partitions.
    job = next(d for d in render("base") if d["kind"] == "Job" and d["metadata"]["name"] == "prefstream-topics")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["topics", "create", "--grow"]


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
    assert "USER 10001" in text and 'ENTRYPOINT ["/usr/bin/tini", "--", "prefstream"]' in text and "torch==2.13.0" in text
    assert re.search(r"apt-get install [^\n]*\btini\b", text)  # PID 1 reaps orphaned processes (sandbox runs)


# ---------------------------------------------------------------------------- hardening
# One Secret per component, named prefstream-<component>, and read key by key (env secretKeyRef, never
# envFrom), so that the keys each pod can see are the ones listed in its manifest.
KAFKA_CREDENTIALS = {"PREFSTREAM_SASL_USERNAME", "PREFSTREAM_SASL_PASSWORD"}
# The model store's S3 keys (the s3 overlay): only the components that use the store.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
S3_COMPONENTS = {"worker", "controller", "retrain"}
# Every Redis client's URL, with the Redis password, is in its own Secret.
REDIS_URL = {"PREFSTREAM_REDIS_URL"}
REDIS_COMPONENTS = {"worker", "review", "controller"}
# Strimzi's cluster CA certificate (strimzi overlay): public, mounted by each Kafka client, key ca.crt only.
KAFKA_CA_SECRET = "prefstream-kafka-cluster-ca-cert"
# Announcements are signed with a private key only the announcers hold; workers get its public half
# and the producer keys they check vouches with. The review app signs Annotations with its own key.
ANNOUNCE_SIGNING = {"PREFSTREAM_ANNOUNCE_SIGNING_KEY"}
WORKER_KEYS = {"PREFSTREAM_ANNOUNCE_PUBLIC_KEY", "PREFSTREAM_WORKER_PRODUCER_KEYS"}
SECRET_KEYS = {
    "worker": KAFKA_CREDENTIALS | S3_CREDENTIALS | WORKER_KEYS | {"PREFSTREAM_REDIS_URL"},
    "review": {"PREFSTREAM_REVIEW_TOKENS", "PREFSTREAM_REDIS_URL", "PREFSTREAM_REVIEW_SIGNING_KEY"} | KAFKA_CREDENTIALS,
    "controller": {"PREFSTREAM_REDIS_URL"} | KAFKA_CREDENTIALS | S3_CREDENTIALS | ANNOUNCE_SIGNING,
    "retrain": KAFKA_CREDENTIALS | S3_CREDENTIALS | ANNOUNCE_SIGNING,
    "topics": KAFKA_CREDENTIALS,
}


def pod_templates(docs):
    """(object, pod template) of every workload, including the retrain Job the controller creates."""
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d, d["spec"]["template"]
        elif d["kind"] == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]


def retrain_job(docs: list[dict] | None = None) -> dict:
    """The Job the controller creates, with the model store the rendering's ConfigMap gives it."""
    data = next((d["data"] for d in docs or [] if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"] == "prefstream-config"), {})
    tpl = JobTemplate(models_url=data.get("PREFSTREAM_MODELS_URL"), shards_url=data.get("PREFSTREAM_SHARDS_URL"),
                      s3_endpoint=data.get("PREFSTREAM_S3_ENDPOINT"),
                      kafka_ca_secret=data.get("PREFSTREAM_CONTROLLER_K8S_KAFKA_CA_SECRET"),
                      kafka_ca_location=data.get("PREFSTREAM_SSL_CA_LOCATION"))
    return job_manifest("prefstream-retrain-current-1", "current", {}, tpl)


def all_containers(pod: dict) -> list[dict]:
    return pod["containers"] + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])


def secret_refs(pod: dict) -> dict[str, set[str]]:
    """Secret name -> keys read, over every way a pod can reference a Secret (None: the whole Secret)."""
    refs: dict[str, set] = {}
    for c in all_containers(pod):
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                refs.setdefault(src["secretRef"]["name"], set()).add(None)
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] == e["name"], "a Secret key is the variable it sets"
                refs.setdefault(ref["name"], set()).add(ref["key"])
    for v in pod.get("volumes", []):
        if "secret" in v:  # the keys its items name, else all of it
            items = v["secret"].get("items")
            refs.setdefault(v["secret"]["secretName"], set()).update({i["key"] for i in items} if items else {None})
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                refs.setdefault(src["secret"]["name"], set()).add(None)
    return refs


def test_each_pod_reads_only_its_own_secret_and_only_the_keys_it_needs(docs):
    assert not [d for d in docs if d["kind"] == "Secret"], "Secret values are never in the repo"
    assert "prefstream-secrets" not in yaml.safe_dump_all(docs), "the shared Secret is gone"
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    seen = set()
    for d, tpl in templates:
        component = tpl["metadata"]["labels"]["app.kubernetes.io/component"]
        refs = secret_refs(tpl["spec"])
        # Besides its own Secret, a pod may mount the Kafka cluster's CA certificate (public, ca.crt only).
        assert refs.pop(KAFKA_CA_SECRET, {"ca.crt"}) == {"ca.crt"}, d["metadata"]["name"]
        assert set(refs) <= {f"prefstream-{component}"}, (d["metadata"]["name"], set(refs))
        for name, keys in refs.items():
            assert None not in keys, f"{d['metadata']['name']} reads all of {name}: list its keys instead"
            assert keys <= SECRET_KEYS[component], (d["metadata"]["name"], keys - SECRET_KEYS[component])
            seen.add(component)
    # The worker's Secret holds Kafka credentials, the store's S3 keys, public or producer keys and its
    # Redis URL only; every component that talks to Kafka gets its credentials.
    assert SECRET_KEYS["worker"] == KAFKA_CREDENTIALS | S3_CREDENTIALS | WORKER_KEYS | REDIS_URL
    for d, tpl in templates:
        component = tpl["metadata"]["labels"]["app.kubernetes.io/component"]
        own = {n: k for n, k in secret_refs(tpl["spec"]).items() if n != KAFKA_CA_SECRET}
        keys = set().union(*own.values()) if own else set()
        assert KAFKA_CREDENTIALS <= keys, f"{d['metadata']['name']} lacks its Kafka credentials"
        if component == "worker":
            assert keys in (KAFKA_CREDENTIALS | WORKER_KEYS | REDIS_URL,
                                         KAFKA_CREDENTIALS | S3_CREDENTIALS | WORKER_KEYS | REDIS_URL)
    assert "review" in seen and "worker" in seen and "controller" in seen


def test_only_the_announcers_hold_the_private_announcement_key_and_signing_keys_are_required(docs):
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    required = {"worker": "PREFSTREAM_ANNOUNCE_PUBLIC_KEY", "controller": "PREFSTREAM_ANNOUNCE_SIGNING_KEY",
                "retrain": "PREFSTREAM_ANNOUNCE_SIGNING_KEY", "review": "PREFSTREAM_REVIEW_SIGNING_KEY"}
    seen = set()
    for d, tpl in templates:
        component = tpl["metadata"]["labels"]["app.kubernetes.io/component"]
        env = {e["name"]: e for c in all_containers(tpl["spec"]) for e in c.get("env", [])}
        if component not in ("controller", "retrain"):
            assert "PREFSTREAM_ANNOUNCE_SIGNING_KEY" not in env, d["metadata"]["name"]
        if component in required:
            ref = env[required[component]]["valueFrom"]["secretKeyRef"]
            assert not ref.get("optional"), f"{d['metadata']['name']} must not start without {required[component]}"
            seen.add(component)
    assert seen == set(required)


def test_retrain_jobs_of_cronjob_and_controller_read_the_same_secret(docs):
    cron = next((d for d in docs if d["kind"] == "CronJob"), None)
    assert cron is not None
    cron_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    job_pod = retrain_job(docs)["spec"]["template"]["spec"]
    s3 = any(d["kind"] == "ConfigMap" and "PREFSTREAM_MODELS_URL" in d["data"] for d in docs)
    tls = any(d["kind"] == "ConfigMap" and "PREFSTREAM_SSL_CA_LOCATION" in d["data"] for d in docs)
    assert secret_refs(cron_pod) == secret_refs(job_pod) == \
        {"prefstream-retrain": KAFKA_CREDENTIALS | ANNOUNCE_SIGNING | (S3_CREDENTIALS if s3 else set())} \
        | ({KAFKA_CA_SECRET: {"ca.crt"}} if tls else {})
    mounts = [{m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-ca"}
              for pod in (cron_pod, job_pod)]
    assert mounts[0] == mounts[1] == ({"/etc/prefstream/kafka-ca"} if tls else set())
    assert cron_pod["serviceAccountName"] == job_pod["serviceAccountName"] == JobTemplate().service_account
    assert cron_pod["containers"][0]["envFrom"] == job_pod["containers"][0]["envFrom"]


def test_the_runbook_creates_each_secret_with_only_the_keys_its_pods_read():
    text = (ROOT / "docs" / "operations.md").read_text()
    start = text.index("## Deployment: Kubernetes")
    k8s = text[start:text.index("\n## ", start + 1)]
    assert "prefstream-secrets" not in k8s
    created: dict[str, set[str]] = {}
    for m in re.finditer(r"create secret generic (prefstream-[a-z]+)((?:[^\n]*\\\n)*[^\n]*)", k8s):
        created.setdefault(m.group(1), set()).update(re.findall(r"--from-literal=([A-Z_]+)=", m.group(2)))
    assert set(created) == {f"prefstream-{c}" for c in SECRET_KEYS}, set(created)
    for component, allowed in SECRET_KEYS.items():
        assert created[f"prefstream-{component}"] <= allowed, (component, created[f"prefstream-{component}"])
    assert created["prefstream-worker"] == KAFKA_CREDENTIALS | {"PREFSTREAM_ANNOUNCE_PUBLIC_KEY"} | REDIS_URL
    for component in REDIS_COMPONENTS:  # required by the pods: the runbook must create it
        assert REDIS_URL <= created[f"prefstream-{component}"], component
    for component in ("controller", "retrain"):
        assert ANNOUNCE_SIGNING <= created[f"prefstream-{component}"], component
    assert "PREFSTREAM_REVIEW_SIGNING_KEY" in created["prefstream-review"]


def test_only_the_controller_gets_a_service_account_token(docs):
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    for d, tpl in templates:
        automount = tpl["spec"].get("automountServiceAccountToken")
        if tpl["metadata"]["labels"]["app.kubernetes.io/component"] == "controller":
            assert automount is not False, "the controller creates Jobs through the Kubernetes API"
        else:
            assert automount is False, d["metadata"]["name"]


# Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/), the
# checks that apply to Linux pods, as Pod Security Admission runs them at "latest".
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def pss_violations(template: dict, level: str) -> set[tuple[str, str]]:
    """(container or 'pod', control) pairs that Pod Security Admission at `level` would refuse."""
    pod, meta = template["spec"], template.get("metadata", {})
    psc = pod.get("securityContext", {})
    out: set[tuple[str, str]] = set()
    # baseline
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(f):
            out.add(("pod", f))
    if psc.get("windowsOptions", {}).get("hostProcess"):
        out.add(("pod", "hostProcess"))
    if psc.get("seccompProfile", {}).get("type") == "Unconfined":
        out.add(("pod", "seccomp"))
    if psc.get("appArmorProfile", {}).get("type") == "Unconfined":
        out.add(("pod", "apparmor"))
    if set(psc.get("seLinuxOptions", {})) - {"type", "level"}:
        out.add(("pod", "selinux"))
    if {s["name"] for s in psc.get("sysctls", [])} - SAFE_SYSCTLS:
        out.add(("pod", "sysctls"))
    for k, v in meta.get("annotations", {}).items():
        if k.startswith("container.apparmor.security.beta.kubernetes.io/") and v == "unconfined":
            out.add((k.rsplit("/", 1)[1], "apparmor"))
    for v in pod.get("volumes", []):
        types = set(v) - {"name"}
        if "hostPath" in types:
            out.add(("pod", "hostPath"))
        if level == "restricted" and not types <= RESTRICTED_VOLUMES:
            out.add(("pod", f"volume {v['name']}"))
    for c in all_containers(pod):
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            out.add((name, "privileged"))
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.add((name, "hostProcess"))
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.add((name, "hostPort"))
        if sc.get("procMount", "Default") != "Default":
            out.add((name, "procMount"))
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            out.add((name, "seccomp"))
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            out.add((name, "apparmor"))
        if set(sc.get("seLinuxOptions", {})) - {"type", "level"}:
            out.add((name, "selinux"))
        caps = sc.get("capabilities", {})
        if set(caps.get("add", [])) - BASELINE_CAPS:
            out.add((name, "capabilities"))
        if level != "restricted":
            continue
        if sc.get("allowPrivilegeEscalation") is not False:
            out.add((name, "allowPrivilegeEscalation"))
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.add((name, "runAsNonRoot"))
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.add((name, "runAsUser"))
        if sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            out.add((name, "seccomp"))
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.add((name, "capabilities"))
    return out


def test_the_namespace_enforces_pod_security_restricted(docs):
    ns = next(d for d in docs if d["kind"] == "Namespace")
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


def test_every_pod_meets_pod_security_restricted(docs):
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    assert len(templates) >= 5
    for d, tpl in templates:
        assert pss_violations(tpl, "restricted") == set(), d["metadata"]["name"]


def test_pss_check_catches_what_restricted_refuses():
    tpl = json.loads(json.dumps(retrain_job()["spec"]["template"]))
    assert pss_violations(tpl, "restricted") == set()
    del tpl["spec"]["securityContext"]["seccompProfile"]
    tpl["spec"]["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_RAW"]}
    tpl["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert pss_violations(tpl, "restricted") == {("retrain", "seccomp"), ("retrain", "capabilities"),
                                                 ("pod", "hostPath"), ("pod", "volume host")}


def test_code_verifier_component_keeps_the_namespace_restricted(tmp_path):
    """The sandbox sidecar runs under Localhost seccomp and AppArmor profiles (shipped beside the
    component), which restricted admits: the namespace keeps enforcing restricted and every pod, the
    worker with its sidecar included, passes it; the seccomp profile lets bwrap build its namespaces
    and refuses what reaches the host kernel's global state."""
    rel = lambda p: os.path.relpath(ROOT / "k8s" / p, tmp_path)  # noqa: E731
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel('base')}]\ncomponents: [{rel('components/code-verifier')}]\n")
    docs = render(tmp_path)
    kv = pytest.importorskip("kubernetes_validate")
    for d in docs:
        kv.validate(d, "1.30.0", strict=True)
    labels = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["labels"]
    assert {labels[f"pod-security.kubernetes.io/{m}"] for m in ("enforce", "audit", "warn")} == {"restricted"}
    for d, tpl in pod_templates(docs):
        assert pss_violations(tpl, "restricted") == set(), d["metadata"]["name"]
        if d["metadata"]["name"] == "prefstream-worker":
            sidecar = tpl["spec"]["initContainers"][0]
            assert not sidecar.get("env") and not sidecar.get("envFrom"), "the sandbox gets no credentials"
            sc = sidecar["securityContext"]
            assert sc["seccompProfile"] == {"type": "Localhost", "localhostProfile": "profiles/prefstream-sandbox.json"}
            assert sc["appArmorProfile"] == {"type": "Localhost", "localhostProfile": "prefstream-sandbox"}
            worker = tpl["spec"]["containers"][0]
            assert worker.get("securityContext", {}).get("seccompProfile", tpl["spec"]["securityContext"]["seccompProfile"]) \
                == {"type": "RuntimeDefault"}, "the worker, which holds the credentials, keeps the runtime default"
    component = ROOT / "k8s" / "components" / "code-verifier"
    seccomp = json.loads((component / "seccomp-prefstream-sandbox.json").read_text())
    denied = {n for rule in seccomp["syscalls"] if rule["action"] != "SCMP_ACT_ALLOW" for n in rule["names"]}
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert not denied & {"unshare", "clone", "clone3", "mount", "umount2", "pivot_root", "execve", "prlimit64"}, \
        "bwrap needs these"
    assert {"kexec_load", "init_module", "finit_module", "bpf", "perf_event_open", "ptrace", "keyctl", "add_key",
            "setns", "open_by_handle_at", "userfaultfd"} <= denied
    apparmor = (component / "apparmor-prefstream-sandbox").read_text()
    assert "profile prefstream-sandbox " in apparmor
    assert all(re.search(rf"^\s*{rule},", apparmor, re.M) for rule in ("userns", "mount", "pivot_root"))


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        present = expr["key"] in labels
        ok = {"In": present and value in expr.get("values", []),
              "NotIn": not present or value not in expr.get("values", []),
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


def test_every_egress_rule_names_its_destination(docs, request):
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policies
    for np in policies:
        for rule in np["spec"].get("egress", []):
            assert rule.get("to"), f"{np['metadata']['name']}: an egress rule without `to` allows any destination"
            assert rule.get("ports"), np["metadata"]["name"]
            for peer in rule["to"]:
                assert peer, "an empty peer matches every pod"
                if "ipBlock" in peer:
                    assert not peer["ipBlock"]["cidr"].endswith("/0"), np["metadata"]["name"]
                for sel in ("podSelector", "namespaceSelector"):
                    if sel in peer:
                        assert peer[sel].get("matchLabels") or peer[sel].get("matchExpressions"), (np, sel)

    def egress_for(labels: dict) -> list[tuple[dict, dict]]:
        return [(peer, rule) for np in policies if selects(np["spec"]["podSelector"], labels)
                for rule in np["spec"].get("egress", []) for peer in rule["to"]]

    def has(labels: dict, port: int, match) -> bool:
        return any(match(peer) and any(p["port"] == port for p in rule["ports"]) for peer, rule in egress_for(labels))

    dns = lambda p: (p.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "kube-system"}  # noqa: E731
                     and p.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"})
    redis = lambda p: p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "redis"  # noqa: E731
    api = lambda p: "ipBlock" in p  # noqa: E731
    in_cluster = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kafka"}}}
    strimzi = {"podSelector": {"matchLabels": {"strimzi.io/cluster": "prefstream-kafka", "strimzi.io/broker-role": "true"}}}
    kafka_peer, kafka_port = {  # where each rendering's Kafka is
        "base": (in_cluster, 9092), "overlays/dev": (in_cluster, 9092), "overlays/prod": (in_cluster, 9092),
        "overlays/strimzi": (strimzi, 9093), "overlays/external-kafka": (None, 9093), "overlays/gpu": (in_cluster, 9092),
        "overlays/s3": (in_cluster, 9092),
    }[request.node.callspec.params["docs"]]
    kafka = (lambda p: p == kafka_peer) if kafka_peer else (lambda p: set(p) == {"ipBlock"})  # noqa: E731
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    for d, tpl in templates:
        labels = tpl["metadata"]["labels"]
        component, name = labels["app.kubernetes.io/component"], d["metadata"]["name"]
        assert {(p["protocol"], p["port"]) for peer, rule in egress_for(labels) if dns(peer) for p in rule["ports"]} \
            >= {("UDP", 53), ("TCP", 53)}, name
        assert has(labels, kafka_port, kafka), name
        assert has(labels, 6379, redis) == (component in ("worker", "review", "controller")), name
        assert has(labels, 6443, api) == (component == "controller"), name


def test_the_gpu_overlay_puts_workers_and_retrains_on_one_gpu_each_and_the_rest_on_cpu():
    docs = render("overlays/gpu")
    gpu_pods = {"prefstream-worker", "prefstream-retrain"}
    for d, pod in pod_specs(docs):
        c = pod["containers"][0]
        if d["metadata"]["name"] not in gpu_pods:
            assert "nvidia.com/gpu" not in c["resources"]["limits"] and "nodeSelector" not in pod, d["metadata"]["name"]
            continue
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert c["image"] == "prefstream:gpu"
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefstream-worker")
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFSTREAM_WORKER_DEVICE"] == "cuda"
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--device", "cuda"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prefstream-config")
    assert cm["data"]["PREFSTREAM_CONTROLLER_JOB_GPUS"] == "1"  # the controller's Jobs ask for a GPU too
    assert cm["data"]["PREFSTREAM_CONTROLLER_K8S_IMAGE"] == "prefstream:gpu"


def test_external_kafka_cidr_is_a_variable_of_the_overlay():
    vars_doc = yaml.safe_load((ROOT / "k8s/overlays/external-kafka/network-vars.yaml").read_text())
    assert vars_doc["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    docs = render("overlays/external-kafka")
    assert not [d for d in docs if d["metadata"]["name"] == vars_doc["metadata"]["name"]], "local-config leaked"
    np = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "prefstream-egress-kafka")
    assert np["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": vars_doc["data"]["KAFKA_CIDR"]}}]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prefstream-config")
    assert not set(cm["data"]) & KAFKA_CREDENTIALS, "SASL credentials are per component, in Secrets"


# ---------------------------------------------------------------------------- model store on S3
def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_s3_overlay_shares_no_volume_and_reads_s3_keys_from_secrets():
    docs = render("overlays/s3")
    vars_doc = yaml.safe_load((ROOT / "k8s/overlays/s3/network-vars.yaml").read_text())
    assert not [d for d in docs if d["metadata"]["name"] == vars_doc["metadata"]["name"]], "local-config leaked"
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prefstream-config")
    assert cm["data"]["PREFSTREAM_MODELS_URL"].startswith("s3://") and cm["data"]["PREFSTREAM_S3_ENDPOINT"]
    assert "PREFSTREAM_MODELS_DIR" not in cm["data"], "only the controller has a models directory, for its state"
    assert cm["data"]["PREFSTREAM_SHARDS_URL"].startswith("s3://") and "PREFSTREAM_SHARDS_DIR" not in cm["data"]
    assert not set(cm["data"]) & S3_CREDENTIALS, "S3 keys are per component, in Secrets"
    # No ReadWriteMany claim is left; the controller's state is on a ReadWriteOnce claim.
    claims = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert not {"prefstream-models", "prefstream-shards"} & set(claims)
    assert not [n for n, modes in claims.items() if "ReadWriteMany" in modes]
    assert claims["prefstream-controller-state"] == ["ReadWriteOnce"]
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    components = set()
    for d, tpl in templates:
        pod, name = tpl["spec"], d["metadata"]["name"]
        component = tpl["metadata"]["labels"]["app.kubernetes.io/component"]
        components.add(component)
        claimed = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                   if "persistentVolumeClaim" in v}
        assert not {"prefstream-models", "prefstream-shards"} & set(claimed.values()), name
        for c in all_containers(pod):
            assert not [m for m in c.get("volumeMounts", []) if m["name"] in ("models", "shards")
                        or m["mountPath"] in ("/data/models", "/data/shards")], (name, c["name"])
            env = env_of(c)
            if component not in S3_COMPONENTS:
                assert not set(env) & S3_CREDENTIALS, name
                continue
            for key in S3_CREDENTIALS:
                assert "value" not in env[key], f"{name}: {key} is a literal"
                assert env[key]["valueFrom"]["secretKeyRef"] == {"name": f"prefstream-{component}", "key": key}, name
        if component == "controller":  # its state directory is the ReadWriteOnce claim
            c = pod["containers"][0]
            state = next(m for m in c["volumeMounts"] if m["mountPath"] == env_of(c)["PREFSTREAM_MODELS_DIR"]["value"])
            assert claimed[state["name"]] == "prefstream-controller-state"
    assert components >= S3_COMPONENTS | {"review", "topics"}
    # Egress to the S3 endpoint's range (the overlay's variable) from exactly the components using the store.
    s3 = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "prefstream-egress-s3")
    assert s3["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": vars_doc["data"]["S3_CIDR"]}}],
                                     "ports": [{"protocol": "TCP", "port": 443}]}]
    for _, tpl in templates:
        labels = tpl["metadata"]["labels"]
        assert selects(s3["spec"]["podSelector"], labels) == (labels["app.kubernetes.io/component"] in S3_COMPONENTS)


def test_retrain_job_with_an_s3_store_has_no_models_volume_and_reads_its_keys_from_its_secret():
    kv = pytest.importorskip("kubernetes_validate")
    tpl = JobTemplate(models_url="s3://bucket/models", s3_endpoint="http://seaweedfs:8333", gpus=2)
    job = job_manifest("prefstream-retrain-current-1", "current", {}, tpl)
    kv.validate(job, "1.30.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "models" not in {v["name"] for v in pod["volumes"]}
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} == \
        {"prefstream-shards"}
    assert "/data/models" not in {m["mountPath"] for m in c["volumeMounts"]}
    env = env_of(c)
    assert "PREFSTREAM_MODELS_DIR" not in env
    assert env["PREFSTREAM_MODELS_URL"]["value"] == "s3://bucket/models"
    assert env["PREFSTREAM_S3_ENDPOINT"]["value"] == "http://seaweedfs:8333"
    for key in S3_CREDENTIALS:  # required: a retrain that cannot reach its store must not start
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "prefstream-retrain", "key": key}}}
    assert secret_refs(pod) == {"prefstream-retrain": KAFKA_CREDENTIALS | S3_CREDENTIALS | ANNOUNCE_SIGNING}
    assert pss_violations(job["spec"]["template"], "restricted") == set()
    # The directory store keeps its volume and no S3 keys; without either store there is no Job.
    local = job_manifest("j", "current", {}, JobTemplate())["spec"]["template"]["spec"]
    assert "PREFSTREAM_MODELS_URL" not in env_of(local["containers"][0])
    assert secret_refs(local) == {"prefstream-retrain": KAFKA_CREDENTIALS | ANNOUNCE_SIGNING}
    with pytest.raises(JobError, match="PREFSTREAM_MODELS_URL"):
        job_manifest("j", "current", {}, JobTemplate(models_pvc=""))


def test_the_controller_gives_its_jobs_its_own_s3_store(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from kubernetes import client

    from streams.runtime import jobs
    from streams.runtime.controller import Controller
    from streams.settings import ControllerSettings, Settings

    monkeypatch.setattr(jobs, "kube_client", lambda: client.ApiClient())  # no cluster: the runner is only built
    settings = Settings(home=tmp_path, models_url="s3://bucket/models", s3_endpoint="http://seaweedfs:8333")
    runner = Controller._make_runner(SimpleNamespace(settings=settings, csettings=ControllerSettings(runner="kubernetes")))
    assert (runner.template.models_url, runner.template.s3_endpoint) == ("s3://bucket/models", "http://seaweedfs:8333")
    local = Controller._make_runner(SimpleNamespace(settings=Settings(home=tmp_path),
                                                    csettings=ControllerSettings(runner="kubernetes")))
    assert local.template.models_url is None and local.template.models_pvc == "prefstream-models"


# ---------------------------------------------------------------------------- Redis and Kafka access
def test_every_redis_client_reads_a_password_bearing_url_from_its_own_secret(docs):
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prefstream-config")
    assert "PREFSTREAM_REDIS_URL" not in cm["data"], "a Redis URL in the ConfigMap carries no password"
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    seen = set()
    for d, tpl in templates:
        component = tpl["metadata"]["labels"]["app.kubernetes.io/component"]
        env = {e["name"]: e for c in tpl["spec"]["containers"] for e in c.get("env", [])}
        if component not in REDIS_COMPONENTS:
            assert "PREFSTREAM_REDIS_URL" not in env, d["metadata"]["name"]
            continue
        ref = env["PREFSTREAM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": f"prefstream-{component}", "key": "PREFSTREAM_REDIS_URL"}, (d["metadata"]["name"], ref)
        seen.add(component)
    assert seen == REDIS_COMPONENTS


def ingress_peers(policies: list[dict], server: dict) -> list[tuple[dict, dict]]:
    """(peer, rule) of every ingress rule of the policies that select pods labelled ``server``."""
    return [(peer, rule) for np in policies if "Ingress" in np["spec"].get("policyTypes", [])
            and selects(np["spec"]["podSelector"], server) for rule in np["spec"].get("ingress", [])
            for peer in rule.get("from", [])]


def test_kafka_and_redis_admit_only_the_prefstream_pods_that_use_them(docs, request):
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    clients = {tpl["metadata"]["labels"]["app.kubernetes.io/component"]: tpl["metadata"]["labels"]
               for _, tpl in templates}
    redis = ingress_peers(policies, {"app.kubernetes.io/name": "redis"})
    assert redis and all(rule.get("ports") == [{"protocol": "TCP", "port": 6379}] for _, rule in redis)
    for component, labels in clients.items():
        admitted = any("podSelector" in peer and "namespaceSelector" not in peer and selects(peer["podSelector"], labels)
                       for peer, _ in redis)
        assert admitted == (component in REDIS_COMPONENTS), component
    assert not [p for p, _ in redis if "ipBlock" in p or "namespaceSelector" in p], "Redis admits no one else"
    kafka = ingress_peers(policies, {"app.kubernetes.io/name": "kafka"})
    if request.node.callspec.params["docs"] in ("overlays/strimzi", "overlays/external-kafka"):
        assert not kafka, "Strimzi's listener policy guards its brokers; an external Kafka has no pod here"
        return
    by_clients = [(p, r) for p, r in kafka if selects(p["podSelector"], clients["worker"])]
    assert by_clients and all({q["port"] for q in r["ports"]} == {9092, 9093} for _, r in by_clients)
    for labels in clients.values():
        assert any(selects(p["podSelector"], labels) for p, _ in by_clients)
    for peer, _ in kafka:  # anyone else is another broker only
        assert set(peer) == {"podSelector"}, peer
        assert selects(peer["podSelector"], clients["worker"]) or peer["podSelector"] == \
            {"matchLabels": {"app.kubernetes.io/name": "kafka"}}, peer


def acl_table(user: dict) -> dict[tuple[str, str, str], set[str]]:
    return {(a["resource"]["type"], a["resource"]["name"], a["resource"]["patternType"]): set(a["operations"])
            for a in user["spec"]["authorization"]["acls"]}


def test_strimzi_serves_only_tls_with_scram_and_each_component_has_exactly_its_acls():
    from streams.deploy import STRIMZI_USERS, strimzi_users_yaml, user_name
    from streams.kafka.topics import ACCESS

    assert STRIMZI_USERS.read_text() == strimzi_users_yaml(), "run `python -m streams.deploy` to regenerate"
    docs = render("overlays/strimzi")
    kafka = next(d for d in docs if d["kind"] == "Kafka")["spec"]
    listeners = kafka["kafka"]["listeners"]
    assert listeners and all(lst["tls"] is True and lst["authentication"] == {"type": "scram-sha-512"}
                             for lst in listeners), "no plaintext or unauthenticated listener"
    assert kafka["kafka"]["authorization"] == {"type": "simple"}
    assert kafka["entityOperator"]["userOperator"]["secretPrefix"], "its user Secrets must not be the components'"
    users = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KafkaUser"}
    assert set(users) == {user_name(c) for c in ACCESS}
    for component, access in ACCESS.items():
        user = users[user_name(component)]
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == "prefstream-kafka"
        assert user["spec"]["authentication"] == {"type": "scram-sha-512", "password": {"valueFrom": {"secretKeyRef": {
            "name": f"prefstream-{component}", "key": "PREFSTREAM_SASL_PASSWORD"}}}}
        acls = acl_table(user)
        topics_ = {name: ops for (kind, name, pattern), ops in acls.items() if kind == "topic"}
        assert all(pattern == "literal" for kind, _, pattern in acls if kind == "topic")
        assert {t for t, ops in topics_.items() if "Read" in ops} == access.reads, component
        assert {t for t, ops in topics_.items() if "Write" in ops} == access.writes, component
        assert all(ops <= {"Describe", "Read", "Write"} for ops in topics_.values()), component
        groups = {(name, pattern) for (kind, name, pattern) in acls if kind == "group"}
        assert groups == {(g, "literal") for g in access.groups}, component
        txn = {(name + ("*" if pattern == "prefix" else "")) for (kind, name, pattern) in acls if kind == "transactionalId"}
        assert txn == set(access.transactional_ids), component
        assert not [k for k in acls if k[0] == "cluster"], "no component administers the cluster"
    # The attacks of an internet-facing pod: only the controller and the retrain jobs announce models,
    # only the review app writes verdicts, only applications write raw pairs.
    writers = lambda topic: {c for c, a in ACCESS.items() if topic in a.writes}  # noqa: E731
    assert writers(MODEL_VERSIONS) == {"controller", "retrain"}
    assert writers(ANNOTATIONS) == {"review"} and writers(RAW) == {"app"}
    # Every Kafka client in the rendering has its user, and reaches the TLS listener with it.
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prefstream-config")["data"]
    assert cm["PREFSTREAM_SECURITY_PROTOCOL"] == "SASL_SSL" and cm["PREFSTREAM_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert cm["PREFSTREAM_BOOTSTRAP"].endswith(f":{listeners[0]['port']}")
    ca_dir = cm["PREFSTREAM_SSL_CA_LOCATION"].rsplit("/", 1)[0]
    templates = list(pod_templates(docs)) + [(retrain_job(docs), retrain_job(docs)["spec"]["template"])]
    for d, tpl in templates:
        component = tpl["metadata"]["labels"]["app.kubernetes.io/component"]
        assert component in ACCESS, d["metadata"]["name"]
        pod = tpl["spec"]
        ca = next(v for v in pod["volumes"] if v["name"] == "kafka-ca")
        assert ca["secret"] == {"secretName": KAFKA_CA_SECRET, "items": [{"key": "ca.crt", "path": "ca.crt"}]}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-ca")
        assert mount["mountPath"] == ca_dir and mount["readOnly"] is True, d["metadata"]["name"]


def test_the_access_table_names_what_the_code_uses():
    """Each component's modules name exactly the topics its access table entry lists, and its groups and
    transactional ids are the ones the code makes (with the default settings, no topic prefix)."""
    import inspect

    from streams.kafka import topics as topic_table
    from streams.kafka.topics import ACCESS
    from streams.review import aggregator, feeder
    from streams.runtime import shard_writer, worker

    modules = {
        "worker": ["streams/runtime/worker.py", "streams/runtime/pipeline.py", "streams/runtime/deferred.py",
                   "streams/runtime/shard_writer.py", "streams/runtime/outputs.py",
                   "streams/runtime/curation/budget.py"],
        "review": ["streams/review/app.py", "streams/review/aggregator.py", "streams/review/feeder.py"],
        "controller": ["streams/runtime/controller.py", "streams/kafka/announce.py"],
        "retrain": ["streams/kafka/announce.py"],
        "app": ["streams/sdk.py"],
    }
    for component, paths in modules.items():
        named: set[str] = set()
        for path in paths:
            text = (ROOT / path).read_text()
            named |= {getattr(topic_table, c) for c in re.findall(r"\btopics\.([A-Z][A-Z_]+)\b", text)
                      if isinstance(getattr(topic_table, c, None), str) and c != "MAX_MESSAGE_BYTES"}
            named |= set(re.findall(r"[\"'](prefs\.[a-z]+|models\.versions)[\"']", text))
        access = ACCESS[component]
        expected = access.reads | access.writes
        if component == "app":  # the SDK also holds the downstream reader of prefs.scored, not an app's user
            named -= {SCORED}
        assert named == expected, (component, named ^ expected)
    group = WorkerSettings().group
    assert set(ACCESS["worker"].groups) == {group, f"{group}-deferred", shard_writer.SHARD_GROUP}
    assert "{wsettings.group}-deferred" in (ROOT / "streams/runtime/deferred.py").read_text()
    assert 'f"prefstream-{settings.topic_prefix}{wsettings.group}-{wsettings.worker_id}"' in inspect.getsource(worker)
    assert ACCESS["worker"].transactional_ids == (f"prefstream-{group}-*",)
    assert 'f"{settings.topic_prefix}prefstream-aggregator"' in inspect.getsource(aggregator.run)
    assert 'prefstream-review-feeder"' in inspect.getsource(feeder)
    assert ACCESS["review"].groups == ("prefstream-aggregator", "prefstream-review-feeder")
    assert ACCESS["review"].transactional_ids == ("prefstream-aggregator",)


def test_kafka_clients_take_tls_and_sasl_from_the_settings(monkeypatch):
    """The variables the strimzi overlay sets reach librdkafka, and librdkafka takes them."""
    certifi = pytest.importorskip("certifi")
    from confluent_kafka import Producer

    from streams.kafka.config import consumer_config, producer_config
    from streams.settings import Settings

    for name, value in {"PREFSTREAM_SECURITY_PROTOCOL": "SASL_SSL", "PREFSTREAM_SASL_MECHANISM": "SCRAM-SHA-512",
                        "PREFSTREAM_SASL_USERNAME": "prefstream-worker", "PREFSTREAM_SASL_PASSWORD": "s3cret-pass",
                        "PREFSTREAM_SSL_CA_LOCATION": certifi.where()}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    for conf in (producer_config(settings), consumer_config(settings, "g")):
        assert {k: conf[k] for k in ("security.protocol", "sasl.mechanism", "sasl.username", "sasl.password",
                                     "ssl.ca.location")} == {
            "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "prefstream-worker",
            "sasl.password": "s3cret-pass", "ssl.ca.location": certifi.where()}
    Producer(producer_config(settings, **{"bootstrap.servers": "127.0.0.1:1"}))  # librdkafka accepts them
    assert "ssl.ca.location" not in producer_config(Settings(_env_file=None, ssl_ca_location=None))
