"""`prefstream stack up|status|down`: the embedded broker and Redis, and topic provisioning.

A durable stack (``Settings.durable``) also runs the object store (streams/embedded/objectstore.py)
and gives the broker an S3 bucket in it instead of memory. The choice is recorded in the home
(``broker.storage``): a home once started durable stays durable, so a later `stack up` without
the option never starts an empty in-memory broker in front of stored data.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import redis

from streams.embedded import binaries
from streams.embedded.apache_kafka import KafkaCluster, uses_kafka
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
# The addresses of the brokers the last `stack up` started, one a line, so `stack down` and `stack status`
# find every broker of a cluster even when run with another PREFSTREAM_BOOTSTRAP.
BROKER_ADDRESSES_FILE = "broker.addresses"


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


def _addresses(bootstrap: str) -> list[str]:
    return [a.strip() for a in bootstrap.split(",") if a.strip()]


def cluster_bootstrap(bootstrap: str, brokers: int) -> str:
    """The bootstrap list of an embedded cluster of ``brokers`` brokers: ``bootstrap`` when it names that many
    addresses, else its one address followed by the next ports (127.0.0.1:9092 and 3 brokers:
    127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094)."""
    addresses = _addresses(bootstrap)
    if len(addresses) == brokers:
        return ",".join(addresses)
    if len(addresses) != 1:
        raise ConfigError(
            f"PREFSTREAM_BOOTSTRAP={bootstrap!r} names {len(addresses)} brokers but {brokers} are asked for (--brokers "
            f"{brokers}); give one address (the other brokers take the ports after it) or exactly {brokers}"
        )
    host, port = _host_port(addresses[0], DEFAULT_KAFKA_PORT, "broker", "PREFSTREAM_BOOTSTRAP")
    return ",".join(f"{host}:{port + i}" for i in range(brokers))


def with_brokers(settings: Settings, durable: bool = False, brokers: int | None = None) -> Settings:
    """``settings`` for an embedded stack asked to be durable and to run ``brokers`` brokers (None: one per
    address of PREFSTREAM_BOOTSTRAP); the bootstrap becomes the whole list, which every process then uses."""
    if durable:
        settings = settings.model_copy(update={"durable": True})
    if brokers is None:
        return settings
    if brokers > 1 and not (settings.durable or (Path(settings.home) / "broker.storage").exists()):
        raise ConfigError(
            f"--brokers {brokers} needs --durable: Tansu brokers share topics, groups and offsets only through the "
            "object store, and in memory each would be a cluster of its own"
        )
    return settings.model_copy(update={"bootstrap": cluster_bootstrap(settings.bootstrap, brokers)})


def _broker_process(home: Path, index: int, address: str) -> ServerProcess:
    """The ``index``-th broker (0-based): 'broker', then 'broker-2', 'broker-3', ... name its pid and log files."""
    host, port = _host_port(address, DEFAULT_KAFKA_PORT, "broker", "PREFSTREAM_BOOTSTRAP")
    return ServerProcess("broker" if index == 0 else f"broker-{index + 1}", home, host, port, marker="tansu",
                         port_setting="PREFSTREAM_BOOTSTRAP")


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
        rhost, rport = _host_port(settings.redis_url, DEFAULT_REDIS_PORT, "Redis", "PREFSTREAM_REDIS_URL")
        # One broker per bootstrap address: several share one cluster through the object store (durable only).
        self.brokers = [_broker_process(self.home, i, a) for i, a in enumerate(_addresses(settings.bootstrap))]
        self.broker = self.brokers[0]
        self.redis = ServerProcess("redis", self.home, rhost, rport, marker="redis-server",
                                   port_setting="PREFSTREAM_REDIS_URL")
        self.object_store = ObjectStore(self.home, ObjectStorePorts.from_s3_port(settings.object_store_port))
        self.storage_file = self.home / "broker.storage"
        # The 'kafka' engine (streams/embedded/apache_kafka.py) takes the Tansu brokers' place; a home whose
        # Kafka cluster was formatted stays on it, and every command uses that cluster's addresses.
        self.kafka: KafkaCluster | None = None
        if uses_kafka(settings.engine, self.home):
            self.kafka = KafkaCluster(
                self.home, [_host_port(a, DEFAULT_KAFKA_PORT, "broker", "PREFSTREAM_BOOTSTRAP")
                            for a in _addresses(settings.bootstrap)], settings.kafka_cache, settings.kafka_version)
            self.settings = settings.model_copy(update={"bootstrap": self.kafka.bootstrap})
            self.brokers = self.kafka.processes
            self.broker = self.brokers[0]

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

    def _broker_answers(self, broker: ServerProcess | None = None) -> bool:
        """Whether ``broker`` answers (by itself, not through another address of the list); None: any broker."""
        if broker is None:
            return broker_answers(self.settings, timeout=0.5)
        return broker_answers(self.settings.model_copy(update={"bootstrap": f"{broker.host}:{broker.port}"}),
                              timeout=0.5)

    def _recorded_brokers(self) -> list[ServerProcess]:
        """Our brokers plus those the last `stack up` in this home recorded (a cluster started with another list)."""
        try:
            recorded = (self.home / BROKER_ADDRESSES_FILE).read_text().split()
        except OSError:
            recorded = []
        known = {(b.host, b.port) for b in self.brokers}
        extra = [_broker_process(self.home, i, a) for i, a in enumerate(recorded)]
        return self.brokers + [b for b in extra if (b.host, b.port) not in known]

    def up(self) -> list[TopicState]:
        """Start what is not running, wait until all answer, provision topics; generate the keys missing under
        PREFSTREAM_HOME/keys (streams/keys.py). Safe to repeat.

        Durable: the object store first, then the broker on its bucket. A broker that kept running
        while the store was away carries on once the store is back (its storage is the store's).
        """
        self.home.mkdir(parents=True, exist_ok=True)
        ensure_local_keys(self.settings)  # the services on this machine sign and verify with these
        if self.kafka is not None:
            return self._up_kafka(self.kafka)
        if len(self.brokers) > 1 and not self.durable:
            raise StackError(
                f"{len(self.brokers)} brokers (PREFSTREAM_BOOTSTRAP={self.settings.bootstrap!r}) share topics, groups "
                "and offsets only through the object store, and in memory each would be a cluster of its own; add "
                "--durable (PREFSTREAM_DURABLE=true) or give one broker address"
            )
        extra_env: dict[str, str] = {}
        if self.durable:
            self.refuse_memory_broker()
            endpoint = self.object_store.start()
            create_bucket(endpoint, BROKER_BUCKET)
            self.storage_file.write_text(DURABLE_STORAGE + "\n")
            extra_env = endpoint.aws_env()
        (self.home / BROKER_ADDRESSES_FILE).write_text(
            "".join(f"{b.host}:{b.port}\n" for b in self._recorded_brokers()))
        # Tansu brokers are stateless: the same (default) cluster id and storage make them one cluster, each
        # answering metadata as the leader of every partition (docs/operations.md, "Several brokers").
        for broker in self.brokers:
            url = f"tcp://{broker.host}:{broker.port}"
            broker.start(
                [str(binaries.tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", self.storage],
                ready=functools.partial(self._broker_answers, broker), env=self._broker_env(extra_env),
            )
        self._start_redis()
        return ensure_topics(self.settings)

    def _up_kafka(self, kafka: KafkaCluster) -> list[TopicState]:
        if self.durable:
            raise StackError(
                f"{self.home} ran Tansu durable (PREFSTREAM_DURABLE or {self.storage_file}), and the 'kafka' engine "
                "keeps its own log on disk; use another PREFSTREAM_HOME for Kafka, or drop --engine kafka"
            )
        kafka.start(lambda host, port: broker_answers(
            self.settings.model_copy(update={"bootstrap": f"{host}:{port}"}), timeout=0.5))
        self._start_redis()
        return ensure_topics(self.settings)

    def _start_redis(self) -> None:
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.redis.start(
            [str(binaries.redis_server()), "--port", str(self.redis.port), "--bind", self.redis.host,
             "--dir", str(data), "--appendonly", "yes", "--save", "", "--daemonize", "no",
             "--protected-mode", "no"],
            ready=self._redis_answers,
        )

    def status(self) -> list[ServerStatus]:
        """One row per server, each broker of a cluster on its own (alive or not)."""
        if self.kafka is not None:
            return [ServerStatus(b.name, b.pid(), f"{b.host}:{b.port}", self._broker_answers(b), b.log_file)
                    for b in self.brokers] + [
                ServerStatus("redis", self.redis.pid(), f"redis://{self.redis.host}:{self.redis.port}",
                             self._redis_answers(), self.redis.log_file)]
        servers = [ServerStatus(b.name, b.pid(), f"{b.host}:{b.port}", self._broker_answers(b), b.log_file)
                   for b in self._recorded_brokers()]
        if self.durable:
            servers.append(ServerStatus("objectstore", self.object_store.process.pid(),
                                        self.object_store.endpoint_url, self.object_store.answers(),
                                        self.object_store.process.log_file))
        servers.append(ServerStatus("redis", self.redis.pid(), f"redis://{self.redis.host}:{self.redis.port}",
                                    self._redis_answers(), self.redis.log_file))
        return servers

    def down(self) -> dict[str, bool]:
        """Stop every server (the brokers before the store they write to); safe when they are not running or crashed."""
        if self.kafka is not None:
            return self.kafka.stop() | {"redis": self.redis.stop()}
        stopped = {b.name: b.stop() for b in self._recorded_brokers()}
        (self.home / BROKER_ADDRESSES_FILE).unlink(missing_ok=True)
        if self.durable or self.object_store.process.pid() is not None:
            stopped["objectstore"] = self.object_store.stop()
        stopped["redis"] = self.redis.stop()
        return stopped
