"""Apache Kafka as the embedded stack's broker: jars fetched once with Maven, N KRaft brokers on this machine.

The jars (``org.apache.kafka:kafka_2.13`` and what it needs at run time) come from Maven Central through
the user's own ``mvn`` (its ~/.m2 and settings.xml) and are copied into
``PREFSTREAM_KAFKA_CACHE/kafka-VERSION/libs``, outside any repository. Each broker runs in combined mode
(broker and controller in one JVM); the controllers form a static quorum of all N. Replication factor
min(3, N) for every topic, the offsets and the transaction log, so a 3-broker cluster survives the loss
of one broker.

The cluster's layout (cluster id, broker addresses, controller ports) is written to
``PREFSTREAM_HOME/kafka/cluster.json`` when the brokers' storage is formatted; the data stays under
``PREFSTREAM_HOME/kafka/broker-N`` across `stack down` and `stack up`, as a Kafka broker's log does.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from streams.embedded.process import ServerProcess, free_port
from streams.exceptions import BinaryNotFoundError, StackError

JAVA_HINT = "install Java 17 or newer (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
MAVEN_HINT = "install Maven (Debian/Ubuntu: apt-get install maven)"
FETCH_TIMEOUT_S = 900
FORMAT_TIMEOUT_S = 120
# Two cores start a JVM broker in ~9 s; a loaded machine or a 3-broker quorum electing needs more.
START_TIMEOUT_S = 120.0
# Combined-mode JVMs are small on this workload; the JVM default (1/4 of RAM each) is not.
HEAP = ("-Xms128m", "-Xmx512m")
# Fewer internal partitions than Kafka's 50 make a fresh broker ready sooner; a local engine needs no more.
INTERNAL_PARTITIONS = 10
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
SCRAM = "SCRAM-SHA-512"
ADMIN_USER = "admin"  # the brokers' own SCRAM user, a super user, when SASL is on
LOG4J_SLF4J_VERSION = "2.25.5"  # the slf4j binding that sends the broker's logs to its log4j2 (its log file)

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>prefstream.local</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
"""


def layout_file(home: Path) -> Path:
    return Path(home) / "kafka" / "cluster.json"


def uses_kafka(engine: str, home: Path) -> bool:
    """Whether a stack in ``home`` runs Apache Kafka: asked for, or this home's Kafka cluster was formatted."""
    return engine == "kafka" or layout_file(home).exists()


def _require(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise BinaryNotFoundError(f"the 'kafka' engine needs `{tool}` on PATH and it was not found; {hint}, "
                                  "or use the default engine (PREFSTREAM_ENGINE=tansu, no Java needed)")
    return found


def java() -> str:
    return _require("java", JAVA_HINT)


def jars_dir(cache: Path, version: str) -> Path:
    return Path(cache).expanduser() / f"kafka-{version}" / "libs"


def fetch_jars(cache: Path, version: str) -> Path:
    """The directory of the Kafka ``version`` jars, fetched with Maven on first use. Safe to repeat.

    The jars are copied into a temporary directory and renamed into place, so an interrupted fetch
    leaves nothing that looks complete.
    """
    libs = jars_dir(cache, version)
    if libs.is_dir():
        return libs
    java()
    mvn = _require("mvn", MAVEN_HINT)
    work = libs.parent
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(POM.format(version=version, log4j=LOG4J_SLF4J_VERSION))
    partial = work / "libs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    argv = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"fetching Apache Kafka {version} with Maven took over {FETCH_TIMEOUT_S} s; check the "
                         "network (Maven Central) and rerun `prefstream stack up --engine kafka`") from exc
    if proc.returncode != 0 or not any(partial.glob(f"kafka_2.13-{version}.jar")):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise StackError(
            f"could not fetch Apache Kafka {version} (org.apache.kafka:kafka_2.13) with Maven (exit "
            f"{proc.returncode}). Check that Maven Central is reachable (a proxy or mirror goes in "
            f"~/.m2/settings.xml) and that PREFSTREAM_KAFKA_VERSION={version!r} is a released 4.x version. "
            f"Maven said:\n{tail}"
        )
    partial.rename(libs)
    return libs


def _cluster_id() -> str:
    # Kafka's Uuid.toString: URL-safe base64 of 16 random bytes, unpadded; it never starts with '-'.
    while (value := base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()).startswith("-"):
        pass
    return value


@dataclass(frozen=True)
class Node:
    node_id: int
    host: str
    port: int
    controller_port: int


class KafkaCluster:
    """N combined-mode KRaft brokers under ``home/kafka``; ``addresses`` are their client listeners."""

    def __init__(self, home: Path, addresses: list[tuple[str, int]], cache: Path, version: str,
                 admin_password: str | None = None) -> None:
        """``admin_password``: clients must authenticate with SASL/SCRAM-SHA-512 and are authorized by ACLs
        (StandardAuthorizer; no ACL, no access); the brokers talk to each other as ``ADMIN_USER``."""
        self.home, self.cache, self.version = Path(home), Path(cache), version
        self.admin_password = admin_password
        self.dir = self.home / "kafka"
        self.layout_file = layout_file(self.home)
        self.nodes = self._layout(addresses)
        self.processes = [ServerProcess(f"kafka-{n.node_id}", self.home, n.host, n.port, marker=MAIN_CLASS,
                                        port_setting="PREFSTREAM_BOOTSTRAP") for n in self.nodes]

    def _layout(self, addresses: list[tuple[str, int]]) -> list[Node]:
        """The recorded nodes when this home has a formatted cluster, else new ones for ``addresses``."""
        recorded = self.recorded()
        if recorded is not None:
            return recorded
        return [Node(i + 1, host, port, free_port(host)) for i, (host, port) in enumerate(addresses)]

    def recorded(self) -> list[Node] | None:
        try:
            data = json.loads(self.layout_file.read_text())
        except (OSError, ValueError):
            return None
        return [Node(**n) for n in data["nodes"]]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    @property
    def replication_factor(self) -> int:
        return min(3, len(self.nodes))

    def check_size(self, brokers: int) -> None:
        """Refuse to start a recorded cluster with another number of brokers than asked for."""
        if self.recorded() is not None and brokers != len(self.nodes):
            raise StackError(
                f"{self.dir} holds a {len(self.nodes)}-broker Kafka cluster ({self.bootstrap}) but {brokers} are "
                f"asked for; use --brokers {len(self.nodes)}, or `prefstream stack down` and delete {self.dir} "
                "(its topics and records are lost) to start another"
            )

    def _properties(self, node: Node) -> str:
        rf = self.replication_factor
        voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in self.nodes)
        client = "SASL_PLAINTEXT" if self.admin_password else "PLAINTEXT"
        return "\n".join(self._security() + [
            "process.roles=broker,controller",
            f"node.id={node.node_id}",
            f"controller.quorum.voters={voters}",
            f"listeners={client}://{node.host}:{node.port},CONTROLLER://{node.host}:{node.controller_port}",
            f"advertised.listeners={client}://{node.host}:{node.port}",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={client}",
            f"listener.security.protocol.map={client}:{client},CONTROLLER:PLAINTEXT",
            f"log.dirs={self.dir / f'broker-{node.node_id}' / 'data'}",
            f"default.replication.factor={rf}",
            f"min.insync.replicas={max(1, rf - 1)}",
            f"offsets.topic.replication.factor={rf}",
            f"offsets.topic.num.partitions={INTERNAL_PARTITIONS}",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={max(1, rf - 1)}",
            f"transaction.state.log.num.partitions={INTERNAL_PARTITIONS}",
            # A local group should not wait 3 s for more members before its first assignment.
            "group.initial.rebalance.delay.ms=0",
            "",
        ])

    def _security(self) -> list[str]:
        if not self.admin_password:
            return []
        login = ('org.apache.kafka.common.security.scram.ScramLoginModule required '
                 f'username="{ADMIN_USER}" password="{self.admin_password}";')
        return [
            f"sasl.enabled.mechanisms={SCRAM}",
            f"sasl.mechanism.inter.broker.protocol={SCRAM}",
            f"listener.name.sasl_plaintext.{SCRAM.lower()}.sasl.jaas.config={login}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            # ANONYMOUS is what the PLAINTEXT controller listener sees: the brokers' own quorum traffic,
            # on a port only this machine reaches.
            f"super.users=User:{ADMIN_USER};User:ANONYMOUS",
            "allow.everyone.if.no.acl.found=false",
        ]

    def _config_file(self, node: Node) -> Path:
        return self.dir / f"broker-{node.node_id}" / "server.properties"

    def _write_config(self, node: Node) -> None:
        path = self._config_file(node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)  # it may hold the admin password
        path.chmod(0o600)  # touch leaves an existing file's mode as it was
        path.write_text(self._properties(node))

    def _java(self, libs: Path, *args: str) -> list[str]:
        return [java(), *HEAP, f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                "-cp", f"{libs}/*", *args]

    def _format(self, libs: Path) -> None:
        """Write each broker's config and format its storage once (a KRaft broker refuses unformatted logs)."""
        cluster_id = _cluster_id()
        procs = []
        for node in self.nodes:
            # No layout recorded: whatever an interrupted format left here belongs to no cluster.
            shutil.rmtree(self.dir / f"broker-{node.node_id}" / "data", ignore_errors=True)
            self._write_config(node)
            scram = ["--add-scram", f"{SCRAM}=[name={ADMIN_USER},password={self.admin_password}]"] \
                if self.admin_password else []
            procs.append(subprocess.Popen(
                self._java(libs, STORAGE_TOOL, "format", "-t", cluster_id, "-c", str(self._config_file(node)), *scram),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for node, proc in zip(self.nodes, procs, strict=True):
            out, _ = proc.communicate(timeout=FORMAT_TIMEOUT_S)
            if proc.returncode != 0:
                raise StackError(f"formatting the storage of Kafka broker {node.node_id} failed (exit "
                                 f"{proc.returncode}):\n{out.strip()[-2000:]}")
        self.layout_file.write_text(json.dumps(
            {"cluster_id": cluster_id, "version": self.version,
             "nodes": [n.__dict__ for n in self.nodes]}, indent=1) + "\n")

    def start(self, answers) -> None:
        """Fetch the jars if needed, format a new cluster, start every broker not running, and wait until each
        answers (``answers(host, port)``). All start before any is waited for: a quorum needs a majority."""
        libs = fetch_jars(self.cache, self.version)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "log4j2.properties").write_text(LOG4J2)
        if self.recorded() is None:
            self._format(libs)
        for node, proc in zip(self.nodes, self.processes, strict=True):
            self._write_config(node)
            proc.start(self._java(libs, MAIN_CLASS, str(self._config_file(node))), ready=lambda: True)
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = list(zip(self.nodes, self.processes, strict=True))
        while waiting:
            for node, proc in list(waiting):
                if proc.pid() is None:
                    raise StackError(f"Kafka broker {node.node_id} exited at start; last lines of "
                                     f"{proc.log_file}:\n{proc.log_tail()}")
                if answers(node.host, node.port):
                    waiting.remove((node, proc))
            if waiting and time.monotonic() > deadline:
                self.stop()
                node, proc = waiting[0]
                raise StackError(f"Kafka broker {node.node_id} did not answer on {node.host}:{node.port} within "
                                 f"{START_TIMEOUT_S:.0f} s; see {proc.log_file}:\n{proc.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> dict[str, bool]:
        """Stop every broker at once: one by one, the last would wait for a quorum that is already gone."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(self.processes)) as pool:
            return dict(zip((p.name for p in self.processes), pool.map(ServerProcess.stop, self.processes),
                            strict=True))
