"""Deployment artifacts derived from the code: Strimzi KafkaTopic resources and the env var names.

`python -m streams.deploy` rewrites k8s/overlays/strimzi/topics.yaml from the topic table, so the
cluster's topics and the code's never drift apart (a test checks the file is current).
"""

from __future__ import annotations

from pathlib import Path

from streams.kafka.topics import TOPICS
from streams.settings import ControllerSettings, ReviewSettings, Settings, WorkerSettings

STRIMZI_TOPICS = Path(__file__).resolve().parent.parent / "k8s" / "overlays" / "strimzi" / "topics.yaml"
STRIMZI_REPLICAS = 3
# Variables a manifest may set that are not prefstream settings: the libraries' own offline switches
# and the S3 keys of the model store (boto3 reads them from the environment).
EXTERNAL_ENV = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def strimzi_topics_yaml() -> str:
    docs = []
    for t in TOPICS:
        cfg = "".join(f'    {k}: "{v}"\n' for k, v in t.config.items())
        docs.append(
            "apiVersion: kafka.strimzi.io/v1beta2\nkind: KafkaTopic\nmetadata:\n"
            f"  name: {t.name.replace('.', '-')}\n  labels:\n    strimzi.io/cluster: prefstream-kafka\n"
            f"spec:\n  topicName: {t.name}\n  partitions: {t.partitions}\n  replicas: {STRIMZI_REPLICAS}\n"
            + (f"  config:\n{cfg}" if cfg else "")
        )
    return "# Generated from streams/topics.py by `python -m streams.deploy`; a test keeps them equal.\n" + "---\n".join(docs)


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
    STRIMZI_TOPICS.write_text(strimzi_topics_yaml())
    print(f"wrote {STRIMZI_TOPICS}")
