"""`prefstream stack up|status|down`: the embedded broker and Redis, and topic provisioning.

A durable stack (``Settings.durable``) also runs the object store (streams/embedded/objectstore.py)
and gives the broker an S3 bucket in it instead of memory. The choice is recorded in the home
(``broker.storage``): a home once started durable stays durable, so a later `stack up` without
the option never starts an empty in-memory broker in front of stored data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import redis

from streams.embedded import binaries
from streams.embedded.objectstore import ObjectStore, ObjectStorePorts, create_bucket
from streams.embedded.process import ServerProcess
from streams.exceptions import ConfigError, StackError
from streams.kafka.admin import TopicState, broker_answers, ensure_topics
from streams.keys import ensure_local_keys
from streams.settings import DEFAULT_KAFKA_PORT, DEFAULT_REDIS_PORT, Settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
MEMORY_STORAGE = "memory://tansu/"
BROKER_BUCKET = "prefstream-broker"
DURABLE_STORAGE = f"s3://{BROKER_BUCKET}/"
# Tansu reads its settings and the S3 client's from the environment too; only ours may reach it.
BROKER_ENV_DROP = ("STORAGE_ENGINE", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "AWS_")


def _host_port(value: str, default_port: int, what: str, env: str) -> tuple[str, int]:
    first = value.split(",")[0].strip()
    parsed = urlparse(first if "://" in first else f"//{first}")
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    if host not in LOCAL_HOSTS:
        raise ConfigError(
            f"{env}={value!r} points at {host}, but the embedded {what} runs on this machine; "
            f"unset {env} or give a 127.0.0.1 address"
        )
    return ("127.0.0.1" if host == "localhost" else host), port


@dataclass
class ServerStatus:
    name: str
    pid: int | None
    address: str
    answers: bool
    log: Path


class Stack:
    """The embedded servers for one Settings (one state directory)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = Path(settings.home).resolve()
        bhost, bport = _host_port(settings.bootstrap, DEFAULT_KAFKA_PORT, "broker", "PREFSTREAM_BOOTSTRAP")
        rhost, rport = _host_port(settings.redis_url, DEFAULT_REDIS_PORT, "Redis", "PREFSTREAM_REDIS_URL")
        self.broker = ServerProcess("broker", self.home, bhost, bport, marker="tansu",
                                    port_setting="PREFSTREAM_BOOTSTRAP")
        self.redis = ServerProcess("redis", self.home, rhost, rport, marker="redis-server",
                                   port_setting="PREFSTREAM_REDIS_URL")
        self.object_store = ObjectStore(self.home, ObjectStorePorts.from_s3_port(settings.object_store_port))
        self.storage_file = self.home / "broker.storage"

    @property
    def durable(self) -> bool:
        """Whether this stack keeps the broker's data in the object store: asked for, or this home was durable."""
        return self.settings.durable or self.storage_file.exists()

    @property
    def storage(self) -> str:
        """The broker's --storage-engine: an S3 bucket when durable, else memory."""
        return DURABLE_STORAGE if self.durable else MEMORY_STORAGE

    def _running_storage(self) -> str | None:
        """The storage engine of our running broker, or None when it does not run."""
        if self.broker.pid() is None:
            return None
        return DURABLE_STORAGE if DURABLE_STORAGE in self.broker.command_line() else MEMORY_STORAGE

    def refuse_memory_broker(self) -> None:
        """Raise when durability is asked for but our broker runs with its data in memory."""
        if self._running_storage() == MEMORY_STORAGE:
            raise StackError(
                f"the embedded broker in {self.home} runs with its data in memory, but a durable stack is asked for; "
                f"`prefstream stack down` first (its topics and records are lost), then start it durable"
            )

    def _broker_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(BROKER_ENV_DROP)}
        return env | extra

    def _redis_answers(self) -> bool:
        try:
            return bool(redis.Redis(host=self.redis.host, port=self.redis.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def _broker_answers(self) -> bool:
        return broker_answers(self.settings, timeout=0.5)

    def up(self) -> list[TopicState]:
        """Start what is not running, wait until all answer, provision topics; generate the keys missing under
        PREFSTREAM_HOME/keys (streams/keys.py). Safe to repeat.

        Durable: the object store first, then the broker on its bucket. A broker that kept running
        while the store was away carries on once the store is back (its storage is the store's).
        """
        self.home.mkdir(parents=True, exist_ok=True)
        ensure_local_keys(self.settings)  # the services on this machine sign and verify with these
        extra_env: dict[str, str] = {}
        if self.durable:
            self.refuse_memory_broker()
            endpoint = self.object_store.start()
            create_bucket(endpoint, BROKER_BUCKET)
            self.storage_file.write_text(DURABLE_STORAGE + "\n")
            extra_env = endpoint.aws_env()
        url = f"tcp://{self.broker.host}:{self.broker.port}"
        self.broker.start(
            [str(binaries.tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage],
            ready=self._broker_answers, env=self._broker_env(extra_env),
        )
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.redis.start(
            [str(binaries.redis_server()), "--port", str(self.redis.port), "--bind", self.redis.host,
             "--dir", str(data), "--appendonly", "yes", "--save", "", "--daemonize", "no",
             "--protected-mode", "no"],
            ready=self._redis_answers,
        )
        return ensure_topics(self.settings)

    def status(self) -> list[ServerStatus]:
        servers = [
            ServerStatus("broker", self.broker.pid(), f"{self.broker.host}:{self.broker.port}",
                         self._broker_answers(), self.broker.log_file),
            ServerStatus("redis", self.redis.pid(), f"redis://{self.redis.host}:{self.redis.port}",
                         self._redis_answers(), self.redis.log_file),
        ]
        if self.durable:
            servers.insert(1, ServerStatus("objectstore", self.object_store.process.pid(),
                                           self.object_store.endpoint_url, self.object_store.answers(),
                                           self.object_store.process.log_file))
        return servers

    def down(self) -> dict[str, bool]:
        """Stop every server (the broker before the store it writes to); safe when they are not running or crashed."""
        stopped = {"broker": self.broker.stop()}
        if self.durable or self.object_store.process.pid() is not None:
            stopped["objectstore"] = self.object_store.stop()
        stopped["redis"] = self.redis.stop()
        return stopped
