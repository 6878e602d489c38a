"""Job runners for the retrain job: LocalRunner (a subprocess, the embedded default) and
KubernetesRunner (a batch/v1 Job through the official `kubernetes` client).

Both run the same command (`prefstream retrain --role R ...`) and read the same outcome: the
RetrainResult JSON the job prints as its last stdout line. Given more than one GPU, both start it
under torchrun (one rank per GPU; rank 0 alone prints the result) and ask it for --device cuda.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from streams.exceptions import JobError
from streams.settings import ControllerSettings, Settings

RESULT_PREFIX = "RETRAIN_RESULT "


@dataclass
class JobOutcome:
    name: str
    succeeded: bool
    result: dict[str, Any] | None
    detail: str = ""


def parse_result(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def retrain_args(role: str, extra: list[str] | None = None, gpus: int = 0) -> list[str]:
    """The arguments of `prefstream retrain`; with GPUs, --device cuda so that a Job whose GPU is not
    visible fails with that error instead of training on its CPU (a later --device in extra wins)."""
    return ["retrain", "--role", role, *(["--device", "cuda"] if gpus > 0 else []), *(extra or [])]


def torchrun_prefix(gpus: int) -> list[str]:
    """What runs `python -m streams.cli` once per GPU: torchrun on this node only (--standalone)."""
    return ["torchrun", "--standalone", f"--nproc_per_node={gpus}"]


class Handle(Protocol):
    name: str

    def done(self) -> bool: ...

    def outcome(self) -> JobOutcome: ...


class JobRunner(Protocol):
    def submit(self, role: str, labels: dict[str, str], extra_args: list[str] | None = None) -> Handle: ...


# ---------------------------------------------------------------------------- local
@dataclass
class LocalHandle:
    name: str
    proc: subprocess.Popen
    log: Path

    def done(self) -> bool:
        return self.proc.poll() is not None

    def outcome(self) -> JobOutcome:
        code = self.proc.wait()
        logs = self.log.read_text(errors="replace")
        return JobOutcome(self.name, code == 0, parse_result(logs), f"exit code {code}; log {self.log}")

    def cancel(self) -> None:
        """Stop the job (the controller is stopping; a half-trained model is never published)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class LocalRunner:
    """Runs `python -m streams.cli retrain ...` as a child process with the caller's environment;
    with ``gpus`` > 1 under torchrun (``python -m torch.distributed.run``), one rank per GPU.

    ``processes`` overrides the rank count without asking for CUDA (gloo on the CPU: tests)."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    gpus: int = 0
    processes: int | None = None

    def argv(self, role: str, extra_args: list[str] | None = None) -> list[str]:
        ranks = self.processes or self.gpus
        launcher = ["-m", "torch.distributed.run", *torchrun_prefix(ranks)[1:]] if ranks > 1 else []
        return [sys.executable, *launcher, "-m", "streams.cli", *retrain_args(role, extra_args, self.gpus)]

    def submit(self, role: str, labels: dict[str, str], extra_args: list[str] | None = None) -> LocalHandle:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"retrain-{role}-{time.strftime('%Y%m%d-%H%M%S')}"
        log = self.log_dir / f"{name}.log"
        argv = self.argv(role, extra_args)
        proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=self.env,
                                stdin=subprocess.DEVNULL)
        return LocalHandle(name, proc, log)


# ---------------------------------------------------------------------------- kubernetes
@dataclass
class JobTemplate:
    """What the controller's ConfigMap says a retrain Job looks like (everything but the role).

    The fields that are settings default to the settings' own defaults; ``from_settings`` fills them."""

    namespace: str = ControllerSettings.model_fields["k8s_namespace"].default
    image: str = ControllerSettings.model_fields["k8s_image"].default
    service_account: str = "prefstream-retrain"
    cpu_request: str = "2"
    memory_request: str = "4Gi"
    cpu_limit: str = "4"
    memory_limit: str = "8Gi"
    shards_pvc: str = "prefstream-shards"
    models_pvc: str = "prefstream-models"
    # The model store in object storage (PREFSTREAM_MODELS_URL, s3://bucket/prefix): set, the Job gets
    # no models volume (models_pvc is ignored) and reads its S3 keys from its own Secret, required.
    models_url: str | None = None
    # The shards in object storage (PREFSTREAM_SHARDS_URL): set, the Job gets no shards volume
    # (shards_pvc is ignored) and mirrors the bucket into its /tmp.
    shards_url: str | None = None
    s3_endpoint: str | None = None
    s3_secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    backoff_limit: int = 1
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 6 * 3600
    env_from_configmap: str = "prefstream-config"
    # The retrain Job's own Secret (the same one the retrain CronJob reads): its Kafka credentials, so
    # that the announce step (models.versions) works under SASL. Only these keys are read from it, each
    # optional (absent under PLAINTEXT); security.protocol and sasl.mechanism come from the ConfigMap.
    secret: str = "prefstream-retrain"
    secret_keys: tuple[str, ...] = ("PREFSTREAM_SASL_USERNAME", "PREFSTREAM_SASL_PASSWORD")
    # Required from the same Secret: the key that signs the Job's announcement (workers serve nothing unsigned).
    signing_secret_keys: tuple[str, ...] = ("PREFSTREAM_ANNOUNCE_SIGNING_KEY",)
    # The Kafka cluster's CA certificate, where the ConfigMap's PREFSTREAM_SSL_CA_LOCATION says the
    # clients find it: mounted (key ca.crt only) from this Secret, e.g. Strimzi's <cluster>-cluster-ca-cert.
    kafka_ca_secret: str | None = None
    kafka_ca_location: str | None = None
    # GPUs per Job (nvidia.com/gpu): 0 = CPU only; more than 1 runs the retrain under torchrun.
    gpus: int = ControllerSettings.model_fields["job_gpus"].default
    # /dev/shm of a multi-GPU Job: NCCL passes data between the ranks through shared memory, and a
    # container's default 64 MiB is too little.
    shm_size: str = "8Gi"

    @classmethod
    def from_settings(cls, settings: Settings, csettings: ControllerSettings) -> JobTemplate:
        """The controller's Jobs: its image and namespace, and its model store and shards (their S3 URLs
        and endpoint, else the volumes)."""
        return cls(namespace=csettings.k8s_namespace, image=csettings.k8s_image, gpus=csettings.job_gpus,
                   models_url=settings.models_url, shards_url=settings.shards_url, s3_endpoint=settings.s3_endpoint,
                   kafka_ca_secret=csettings.k8s_kafka_ca_secret,
                   kafka_ca_location=str(settings.ssl_ca_location or "") or None)


def _store_parts(tpl: JobTemplate) -> dict[str, list[dict[str, Any]]]:
    """What the model store and the shards add to the Job's pod: for each, its volume, or its S3 URL;
    the S3 endpoint and keys once when either is in object storage."""
    env: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if tpl.shards_url:
        # The mirror goes to the Job's writable /tmp (the root file system is read-only).
        env += [{"name": "PREFSTREAM_SHARDS_URL", "value": tpl.shards_url},
                {"name": "PREFSTREAM_SHARDS_CACHE_DIR", "value": "/tmp/shard-cache"}]
    else:
        env.append({"name": "PREFSTREAM_SHARDS_DIR", "value": "/data/shards"})
        mounts.append({"name": "shards", "mountPath": "/data/shards", "readOnly": True})
        volumes.append({"name": "shards", "persistentVolumeClaim": {"claimName": tpl.shards_pvc}})
    if tpl.models_url:
        env.append({"name": "PREFSTREAM_MODELS_URL", "value": tpl.models_url})
    elif tpl.models_pvc:
        env.append({"name": "PREFSTREAM_MODELS_DIR", "value": "/data/models"})
        mounts.append({"name": "models", "mountPath": "/data/models"})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": tpl.models_pvc}})
    else:
        raise JobError("a retrain Job needs a model store: set PREFSTREAM_MODELS_URL (s3://bucket/prefix) or "
                       "give the JobTemplate the models PersistentVolumeClaim (models_pvc)")
    if tpl.models_url or tpl.shards_url:
        env += [{"name": "PREFSTREAM_S3_ENDPOINT", "value": tpl.s3_endpoint}] if tpl.s3_endpoint else []
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": tpl.secret, "key": key}}}
                for key in tpl.s3_secret_keys]
    return {"env": env, "mounts": mounts, "volumes": volumes}


def _gpu_parts(tpl: JobTemplate) -> dict[str, Any]:
    """What GPUs add to the Job's pod: the resource, a toleration of GPU nodes' usual taint, torchrun
    and a memory-backed /dev/shm for more than one GPU."""
    if tpl.gpus <= 0:
        return {"resources": {}, "pod": {}, "command": {}, "mounts": [], "volumes": []}
    multi = tpl.gpus > 1
    return {
        # Requests and limits of an extended resource must be equal.
        "resources": {"nvidia.com/gpu": str(tpl.gpus)},
        "pod": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "command": {"command": [*torchrun_prefix(tpl.gpus), "-m", "streams.cli"]} if multi else {},
        "mounts": [{"name": "dshm", "mountPath": "/dev/shm"}] if multi else [],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": tpl.shm_size}}] if multi else [],
    }


def _kafka_ca_parts(tpl: JobTemplate) -> dict[str, list[dict[str, Any]]]:
    """The CA certificate volume and mount of a Job whose Kafka listener is TLS (none without one)."""
    if not (tpl.kafka_ca_secret and tpl.kafka_ca_location):
        return {"volumes": [], "mounts": []}
    where = PurePosixPath(tpl.kafka_ca_location)
    return {"volumes": [{"name": "kafka-ca", "secret": {"secretName": tpl.kafka_ca_secret,
                                                        "items": [{"key": "ca.crt", "path": where.name}]}}],
            "mounts": [{"name": "kafka-ca", "mountPath": str(where.parent), "readOnly": True}]}


def job_manifest(name: str, role: str, labels: dict[str, str], tpl: JobTemplate, extra_args: list[str] | None = None) -> dict:
    """The batch/v1 Job for one retrain, as a plain dict (validated against the Kubernetes schema in tests)."""
    all_labels = {"app.kubernetes.io/name": "prefstream", "app.kubernetes.io/component": "retrain",
                  "prefstream.io/role": role} | labels
    gpu = _gpu_parts(tpl)
    store = _store_parts(tpl)
    ca = _kafka_ca_parts(tpl)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": tpl.namespace, "labels": all_labels},
        "spec": {
            "backoffLimit": tpl.backoff_limit,
            "ttlSecondsAfterFinished": tpl.ttl_seconds_after_finished,
            "activeDeadlineSeconds": tpl.active_deadline_seconds,
            "template": {
                "metadata": {"labels": all_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": tpl.service_account,
                    "automountServiceAccountToken": False,  # the Job never calls the Kubernetes API
                    # Pod Security `restricted` (the namespace enforces it).
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    **gpu["pod"],
                    "containers": [{
                        "name": "retrain", "image": tpl.image,
                        **gpu["command"],  # torchrun in place of the image's prefstream entrypoint
                        "args": retrain_args(role, extra_args, tpl.gpus),
                        "envFrom": [{"configMapRef": {"name": tpl.env_from_configmap}}],
                        "env": store["env"]
                               + [{"name": key, "valueFrom": {"secretKeyRef": {"name": tpl.secret, "key": key,
                                                                              "optional": True}}}
                                  for key in tpl.secret_keys]
                               + [{"name": key, "valueFrom": {"secretKeyRef": {"name": tpl.secret, "key": key}}}
                                  for key in tpl.signing_secret_keys],
                        "resources": {"requests": {"cpu": tpl.cpu_request, "memory": tpl.memory_request}
                                      | gpu["resources"],
                                      "limits": {"cpu": tpl.cpu_limit, "memory": tpl.memory_limit}
                                      | gpu["resources"]},
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [*store["mounts"],
                                         {"name": "tmp", "mountPath": "/tmp"}] + gpu["mounts"] + ca["mounts"],
                    }],
                    "volumes": [*store["volumes"],
                                {"name": "tmp", "emptyDir": {}}] + gpu["volumes"] + ca["volumes"],
                },
            },
        },
    }


def kube_client(in_cluster: bool | None = None, kubeconfig: str | None = None, host: str | None = None) -> Any:
    """An ApiClient: in-cluster service-account auth when inside a pod, else a kubeconfig (or ``host``)."""
    from kubernetes import client, config

    if host:  # explicit endpoint (tests, or a proxy started with `kubectl proxy`)
        cfg = client.Configuration()
        cfg.host = host
        return client.ApiClient(cfg)
    try:
        if in_cluster or (in_cluster is None and os.environ.get("KUBERNETES_SERVICE_HOST")):
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=kubeconfig)
    except config.ConfigException as exc:
        raise JobError(f"no Kubernetes credentials: {exc}. Inside a pod mount a service account; outside give "
                       "--kubeconfig or KUBECONFIG") from exc
    return client.ApiClient()


@dataclass
class KubernetesHandle:
    name: str
    runner: KubernetesRunner

    def done(self) -> bool:
        status = self.runner.batch.read_namespaced_job_status(self.name, self.runner.template.namespace).status
        return status is not None and bool(status.succeeded or status.failed)

    def outcome(self) -> JobOutcome:
        return self.runner.wait(self.name)


class KubernetesRunner:
    def __init__(self, template: JobTemplate, api_client: Any = None, poll_s: float = 5.0) -> None:
        from kubernetes import client

        self.template = template
        self.api = api_client or kube_client()
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.poll_s = poll_s

    def submit(self, role: str, labels: dict[str, str], extra_args: list[str] | None = None) -> KubernetesHandle:
        from kubernetes.client.exceptions import ApiException

        name = f"prefstream-retrain-{role}-{time.strftime('%Y%m%d%H%M%S')}"
        body = job_manifest(name, role, labels, self.template, extra_args)
        try:
            self.batch.create_namespaced_job(self.template.namespace, body)  # type: ignore[arg-type]  # the client takes a dict body as it does a V1Job
        except ApiException as exc:
            raise JobError(f"creating Job {name} failed: {exc.status} {exc.reason}: {exc.body}") from exc
        return KubernetesHandle(name, self)

    def wait(self, name: str, timeout_s: float | None = None) -> JobOutcome:
        """Watch the Job until it succeeds or fails, then read the result from its pod's log."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        ns = self.template.namespace
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        status = None
        w = watch.Watch()
        try:
            for event in w.stream(self.batch.list_namespaced_job, ns, field_selector=f"metadata.name={name}",
                                  timeout_seconds=int(timeout_s or self.template.active_deadline_seconds)):
                status = event["object"].status
                if status.succeeded or status.failed:
                    w.stop()
                    break
                if deadline and time.monotonic() > deadline:
                    w.stop()
                    break
        except ApiException as exc:
            raise JobError(f"watching Job {name} failed: {exc.status} {exc.reason}") from exc
        if status is None or not (status.succeeded or status.failed):
            status = self.batch.read_namespaced_job_status(name, ns).status
        logs = ""
        pods = self.core.list_namespaced_pod(ns, label_selector=f"job-name={name}").items
        if pods and pods[-1].metadata is not None and pods[-1].metadata.name:
            logs = self.core.read_namespaced_pod_log(pods[-1].metadata.name, ns, tail_lines=200)
        succeeded, failed = (status.succeeded, status.failed) if status is not None else (None, None)
        return JobOutcome(name, bool(succeeded), parse_result(logs), f"succeeded={succeeded} failed={failed}")
