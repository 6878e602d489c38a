"""`prefstream stack up|status|down`: the embedded broker and Redis, and topic provisioning."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import redis

from streams.embedded import binaries
from streams.embedded.process import ServerProcess
from streams.exceptions import ConfigError
from streams.kafka.admin import TopicState, broker_answers, ensure_topics
from streams.settings import DEFAULT_KAFKA_PORT, DEFAULT_REDIS_PORT, Settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


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

    def _redis_answers(self) -> bool:
        try:
            return bool(redis.Redis(host=self.redis.host, port=self.redis.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def _broker_answers(self) -> bool:
        return broker_answers(self.settings, timeout=0.5)

    def up(self) -> list[TopicState]:
        """Start what is not running, wait until both answer, provision topics. Safe to repeat."""
        self.home.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.broker.host}:{self.broker.port}"
        # Tansu reads settings from the environment too; pass only what we mean.
        env = {k: v for k, v in os.environ.items() if k not in {"STORAGE_ENGINE", "LISTENER_URL", "ADVERTISED_LISTENER_URL"}}
        self.broker.start(
            [str(binaries.tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            ready=self._broker_answers, env=env,
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
        return [
            ServerStatus("broker", self.broker.pid(), f"{self.broker.host}:{self.broker.port}",
                         self._broker_answers(), self.broker.log_file),
            ServerStatus("redis", self.redis.pid(), f"redis://{self.redis.host}:{self.redis.port}",
                         self._redis_answers(), self.redis.log_file),
        ]

    def down(self) -> dict[str, bool]:
        """Stop both servers; safe when they are not running or crashed."""
        return {"broker": self.broker.stop(), "redis": self.redis.stop()}
