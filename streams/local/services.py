"""One deployment on this machine: the stack (embedded or configured), workers, review app, controller.

`prefstream up` and `make demo` both start the same services through ``Deployment``; only what
they do around it differs (a live status view; a scripted run with a report).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path

import redis

from streams.embedded.process import free_port
from streams.embedded.stack import Stack
from streams.exceptions import ConfigError, StreamsError
from streams.kafka.admin import broker_answers, ensure_topics
from streams.keys import ensure_local_keys
from streams.local.supervisor import Supervisor, SupervisorError
from streams.settings import Settings, child_env

# The /metrics URLs of the running deployment's workers, one a line, in PREFSTREAM_HOME.
WORKER_METRICS_FILE = "workers.metrics"


def redis_answers(settings: Settings) -> bool:
    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_stack(settings: Settings) -> Stack | None:
    """Use the broker and Redis when both answer; else start the embedded ones (returned, to stop later)."""
    if broker_answers(settings) and redis_answers(settings):
        if settings.durable:
            with contextlib.suppress(ConfigError):  # a broker elsewhere is not ours to judge
                Stack(settings).refuse_memory_broker()
        ensure_topics(settings)
        return None
    try:
        stack = Stack(settings)
    except ConfigError as exc:
        raise StreamsError(f"the configured broker or Redis does not answer, and prefstream only starts embedded "
                           f"servers on this machine: {exc}") from exc
    stack.up()
    return stack


@dataclass
class Deployment:
    settings: Settings
    log_dir: Path
    workers: int = 1
    review_host: str = "127.0.0.1"
    review_port: int = 8080
    review_tokens: str = ""  # 'name:token,...' (secret; passed to the review app through its environment)
    review_experts: str = ""
    worker_env: dict[str, str] = field(default_factory=dict)
    controller_env: dict[str, str] = field(default_factory=dict)
    controller: bool = True
    stack: Stack | None = None
    sup: Supervisor | None = None
    worker_metrics: list[str] = field(default_factory=list)

    @property
    def review_url(self) -> str:
        return f"http://{self.review_host}:{self.review_port}"

    def start(self, ready_timeout: float = 240) -> None:
        self.start_stack()
        self.start_services(ready_timeout)

    def start_stack(self) -> None:
        self.stack = ensure_stack(self.settings)

    def start_services(self, ready_timeout: float = 240) -> None:
        # Services on this machine find their keys in the home (a configured broker gets none from `stack up`).
        ensure_local_keys(self.settings)
        self.sup = Supervisor(child_env(self.settings), self.log_dir)
        children = []
        for i in range(self.workers):
            port = free_port()
            # A stable worker id per slot: a restarted `up` fences its own predecessor's transactions.
            env = {"PREFSTREAM_WORKER_WORKER_ID": f"up-w{i}"} | self.worker_env
            child = self.sup.start(f"worker-{i}", ["worker", "--health-port", str(port)], env=env,
                                   ready_url=f"http://127.0.0.1:{port}/readyz")
            self.worker_metrics.append(f"http://127.0.0.1:{port}/metrics")
            children.append(child)
        # `prefstream stack status` reads the workers' assignment and lag from these endpoints.
        Path(self.settings.home).mkdir(parents=True, exist_ok=True)
        (Path(self.settings.home) / WORKER_METRICS_FILE).write_text("".join(u + "\n" for u in self.worker_metrics))
        children.append(self.sup.start(
            "review", ["review", "--host", self.review_host, "--port", str(self.review_port)],
            env={"PREFSTREAM_REVIEW_TOKENS": self.review_tokens, "PREFSTREAM_REVIEW_EXPERTS": self.review_experts},
            ready_url=f"{self.review_url}/healthz"))
        if self.controller:
            port = free_port()
            children.append(self.sup.start("controller", ["controller"],
                                           env=self.controller_env | {"PREFSTREAM_CONTROLLER_HEALTH_PORT": str(port)},
                                           ready_url=f"http://127.0.0.1:{port}/healthz"))
        for child in children:
            self.sup.wait_ready(child, ready_timeout)

    def check(self) -> None:
        """Raise if a service died (with the end of its log)."""
        if self.sup is None:
            return
        for child in self.sup.dead():
            raise SupervisorError(f"{child.name} died with exit code {child.proc.returncode}; its log ({child.log}) "
                                  f"ends:\n{child.tail()}")

    def stop_services(self) -> dict[str, int | None]:
        (Path(self.settings.home) / WORKER_METRICS_FILE).unlink(missing_ok=True)
        return self.sup.stop_all() if self.sup else {}

    def left_running(self) -> list[str]:
        return [c.name for c in (self.sup.children if self.sup else []) if c.proc.poll() is None]

    def stop_stack(self) -> None:
        """Stop the embedded stack if this deployment started it (a configured one is left alone)."""
        if self.stack is not None:
            gc.collect()  # close idle Kafka clients first, so they do not log the broker going away
            self.stack.down()

    def stop(self) -> dict[str, int | None]:
        codes = self.stop_services()
        self.stop_stack()
        return codes
