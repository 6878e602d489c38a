"""Deployment artifacts derived from the code: Strimzi KafkaTopic and KafkaUser resources, the partition
count wherever a manifest carries it, and the env var names.

`python -m streams.deploy` rewrites k8s/overlays/strimzi/topics.yaml from the topic table and
k8s/overlays/strimzi/users.yaml from its access table (``topics.ACCESS``: one KafkaUser per component,
with ACLs for exactly the topics, groups and transactional ids it uses), and the patches that put
PREFSTREAM_PARTITIONS into the ConfigMap, the HPA's maxReplicas and KEDA's maxReplicaCount
(k8s/base/partitions.yaml, k8s/components/keda/partitions.yaml), so the cluster and the code never
drift apart (tests check every file is current and every count equal).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from streams.kafka.topics import ACCESS, TOPICS
from streams.settings import ControllerSettings, ReviewSettings, Settings, WorkerSettings

STRIMZI_TOPICS = Path(__file__).resolve().parent.parent / "k8s" / "overlays" / "strimzi" / "topics.yaml"
STRIMZI_USERS = STRIMZI_TOPICS.with_name("users.yaml")
PARTITIONS_PATCH = STRIMZI_TOPICS.parents[2] / "base" / "partitions.yaml"
KEDA_PARTITIONS_PATCH = STRIMZI_TOPICS.parents[2] / "components" / "keda" / "partitions.yaml"
GENERATED = ("# Generated from PREFSTREAM_PARTITIONS by `python -m streams.deploy` (PREFSTREAM_PARTITIONS=N python -m\n"
             "# streams.deploy changes every partition count); a test keeps the manifests equal to it.")
STRIMZI_REPLICAS = 3
STRIMZI_CLUSTER = "prefstream-kafka"
# Variables a manifest may set that are not prefstream settings: the libraries' own offline switches
# and the S3 keys of the model store (boto3 reads them from the environment).
EXTERNAL_ENV = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def strimzi_topics_yaml(partitions: int) -> str:
    """The KafkaTopics of the topic table, the data topics with ``partitions`` partitions (PREFSTREAM_PARTITIONS)."""
    settings = Settings(partitions=partitions)
    docs = []
    for t in TOPICS:
        cfg = "".join(f'    {k}: "{v}"\n' for k, v in t.config.items())
        docs.append(
            "apiVersion: kafka.strimzi.io/v1beta2\nkind: KafkaTopic\nmetadata:\n"
            f"  name: {t.name.replace('.', '-')}\n  labels:\n    strimzi.io/cluster: prefstream-kafka\n"
            f"spec:\n  topicName: {t.name}\n  partitions: {t.partitions_in(settings)}\n  replicas: {STRIMZI_REPLICAS}\n"
            + (f"  config:\n{cfg}" if cfg else "")
        )
    return ("# Generated from streams/kafka/topics.py and PREFSTREAM_PARTITIONS by `python -m streams.deploy`; a test "
            "keeps them equal.\n" + "---\n".join(docs))


def partitions_patch_yaml(partitions: int) -> str:
    """k8s/base/partitions.yaml: the partition count in the ConfigMap (workers, topics Job) and as the HPA's
    maximum (a worker beyond the partition count would own no partition and idle)."""
    return (f"{GENERATED}\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: prefstream-config\n"
            f'data:\n  PREFSTREAM_PARTITIONS: "{partitions}"\n---\n'
            "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: prefstream-worker\n"
            f"spec:\n  maxReplicas: {partitions}\n")


def keda_partitions_patch_yaml(partitions: int) -> str:
    """k8s/components/keda/partitions.yaml: the partition count as KEDA's maximum."""
    return (f"{GENERATED}\napiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:\n  name: prefstream-worker\n"
            f"spec:\n  maxReplicaCount: {partitions}\n")


def deployed_partitions() -> int:
    """The partition count the manifests carry (k8s/base/partitions.yaml's ConfigMap)."""
    config = next(d for d in yaml.safe_load_all(PARTITIONS_PATCH.read_text()) if d["kind"] == "ConfigMap")
    return int(config["data"]["PREFSTREAM_PARTITIONS"])


def generated_files(partitions: int) -> dict[Path, str]:
    """Every file `python -m streams.deploy` writes, with its content for ``partitions``."""
    return {STRIMZI_TOPICS: strimzi_topics_yaml(partitions), STRIMZI_USERS: strimzi_users_yaml(),
            PARTITIONS_PATCH: partitions_patch_yaml(partitions),
            KEDA_PARTITIONS_PATCH: keda_partitions_patch_yaml(partitions)}


def user_name(component: str) -> str:
    """The KafkaUser, SASL user name and Secret of a component: prefstream-<component>."""
    return f"prefstream-{component}"


def _acl(kind: str, name: str, operations: list[str]) -> dict:
    prefix = name.endswith("*")
    return {"resource": {"type": kind, "name": name.rstrip("*"), "patternType": "prefix" if prefix else "literal"},
            "operations": operations}


def strimzi_user(component: str) -> dict:
    """The KafkaUser of ``component``: SCRAM-SHA-512 with the password its own Secret holds
    (PREFSTREAM_SASL_PASSWORD, the key its pods read), and the ACLs of its ``topics.ACCESS`` entry."""
    access = ACCESS[component]
    acls = []
    for topic in sorted(access.reads | access.writes):
        ops = ["Describe"] + (["Read"] if topic in access.reads else []) + (["Write"] if topic in access.writes else [])
        acls.append(_acl("topic", topic, ops))
    acls += [_acl("group", g, ["Read"]) for g in access.groups]
    acls += [_acl("transactionalId", t, ["Describe", "Write"]) for t in access.transactional_ids]
    return {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaUser",
            "metadata": {"name": user_name(component), "labels": {"strimzi.io/cluster": STRIMZI_CLUSTER}},
            "spec": {"authentication": {"type": "scram-sha-512", "password": {"valueFrom": {"secretKeyRef": {
                         "name": user_name(component), "key": "PREFSTREAM_SASL_PASSWORD"}}}},
                     "authorization": {"type": "simple", "acls": acls}}}


def strimzi_users_yaml() -> str:
    return ("# Generated from the access table in streams/kafka/topics.py by `python -m streams.deploy`; a test keeps\n"
            "# them equal. Each user's password is the PREFSTREAM_SASL_PASSWORD of its component's Secret.\n"
            + yaml.safe_dump_all([strimzi_user(c) for c in ACCESS], sort_keys=False, default_flow_style=None, width=110))


def settings_env_names() -> set[str]:
    """Every environment variable the settings classes read."""
    names = set()
    for cls in (Settings, WorkerSettings, ControllerSettings, ReviewSettings):
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            names.add(f"{prefix}{name}".upper())
            alias = field.validation_alias
            for choice in getattr(alias, "choices", []) or []:
                names.add(str(choice).upper())
    return names


if __name__ == "__main__":
    # PREFSTREAM_PARTITIONS (the setting, default 6) is the one value every partition count derives from.
    for path, text in generated_files(Settings().partitions).items():
        path.write_text(text)
        print(f"wrote {path}")
