"""Service settings, from environment variables (``PREFSTREAM_*``) through pydantic-settings.

The same code runs against the embedded stack and a real Kafka cluster: only these values change.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_KAFKA_PORT = 9092
DEFAULT_REDIS_PORT = 6379


class Settings(BaseSettings):
    """Where prefstream finds Kafka, Redis, its state and its artifacts."""

    model_config = SettingsConfigDict(env_prefix="PREFSTREAM_", frozen=True, extra="ignore")

    bootstrap: str = Field(
        f"127.0.0.1:{DEFAULT_KAFKA_PORT}",
        description="Kafka bootstrap servers, host:port[,host:port]. The embedded broker listens here.",
    )
    redis_url: str = Field(
        f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0",
        description="Redis URL (dedupe set, review queue). The embedded Redis listens here.",
    )
    schema_registry_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "PREFSTREAM_SCHEMA_REGISTRY_URL"),
        description="Confluent Schema Registry URL; when set, values use the Confluent wire format.",
    )
    topic_prefix: str = Field(
        "", description="Prefix for every topic name, to share one cluster between deployments or tests."
    )
    home: Path = Field(Path(".prefstream"), description="State directory: pids, logs, embedded data.")
    models_dir: Path = Field(Path(".prefstream/models"), description="Model store (a PVC in Kubernetes).")
    shards_dir: Path = Field(Path(".prefstream/shards"), description="Training shards written by the stream.")
    security_protocol: str = Field("PLAINTEXT", description="Kafka security.protocol (PLAINTEXT, SASL_SSL, ...).")
    sasl_mechanism: str | None = Field(None, description="Kafka sasl.mechanism, e.g. SCRAM-SHA-512.")
    sasl_username: str | None = Field(None, description="Kafka SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="Kafka SASL password (from a Secret, never a file).")

    def topic(self, name: str) -> str:
        """The physical topic name for a logical one (e.g. 'prefs.raw')."""
        return f"{self.topic_prefix}{name}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
