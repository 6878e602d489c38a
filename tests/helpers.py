"""Shared test helpers: running the CLI against the test stack, shared data, repeated checks."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.settings import Settings, child_env

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz"


needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed: `apt-get install bubblewrap` (.ci/run installs it)")


def require_hh_rlhf() -> Path:
    if not HH_RLHF.exists():
        pytest.skip(f"shared data not present: {HH_RLHF} (a fresh clone without ../shared/data skips this)")
    return HH_RLHF


def hh_lines(limit: int) -> list[dict]:
    with gzip.open(require_hh_rlhf(), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(limit), fh, strict=False)]


def hh_valid_pairs(n: int) -> list[dict]:
    """The first ``n`` HH-RLHF lines that make valid pairs, parsed the documented way."""
    from schemas.exceptions import InvalidRecordError
    from schemas.formats import from_hh_rlhf
    from schemas.pairs import validate_pair

    out = []
    for line in hh_lines(n * 2):
        try:
            out.append(validate_pair(from_hh_rlhf(line)))
        except InvalidRecordError:
            continue
        if len(out) == n:
            break
    return out


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment for a subprocess that should see the same stack and topic prefix."""
    return child_env(settings)


def run_cli(args: list[str], settings: Settings, *, check: bool = True, timeout: float = 300,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `prefstream ARGS` as a user would, in a subprocess, against ``settings``."""
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], env=settings_env(settings), cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"prefstream {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """A separable toy set: chosen answers state the right sum politely, rejected ones refuse rudely."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append({"conversation": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                    "chosen": f"Happy to help: {a} plus {b} is {a + b}.",
                    "rejected": rng.choice(["No idea, go away.", "Figure it out yourself.", "Whatever, I refuse."]),
                    "extra": {}})
    return out


def assert_trained(result, min_accuracy: float = 0.9) -> None:
    """The one check for a training run: loss fell, every trainable parameter changed, accuracy reached."""
    m = result.metrics
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses[:3]} -> {losses[-3:]}"
    assert m["unchanged_parameters"] == [], f"parameters never updated: {m['unchanged_parameters']}"
    assert m["trainable_parameters_changed"] == m["trainable_parameters"] > 0
    assert m["eval_accuracy"] > min_accuracy, f"held-out accuracy {m['eval_accuracy']}"
    for name in ("model.safetensors", "metrics.json", "config.json", "curve.png"):
        assert (result.output_dir / name).exists(), f"{name} not written"


class WorkerProcess:
    """`prefstream worker` in a subprocess against the test stack, as an operator would run it."""

    def __init__(self, settings: Settings, worker_id: str = "w0", extra_env: dict[str, str] | None = None) -> None:
        from streams.embedded.process import free_port

        self.settings, self.worker_id = settings, worker_id
        self.port = free_port()
        self.env = settings_env(settings) | {"PREFSTREAM_WORKER_WORKER_ID": worker_id,
                                             "PREFSTREAM_WORKER_SHARD_MAX_AGE_S": "1"} | (extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.log = Path(settings.shards_dir).parent / f"worker-{worker_id}.log"

    def start(self, wait_ready: float = 120) -> WorkerProcess:
        import time
        import urllib.request

        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--health-port", str(self.port)],
                                     env=self.env, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {wait_ready} s:\n{self.log.read_text()[-3000:]}")

    def metrics(self) -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()

    def kill9(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else 0


def read_topic(settings: Settings, name: str, schema: str, idle: float = 3.0) -> list[dict]:
    """Every record value of a logical topic (read_committed, from the beginning)."""
    from streams.kafka.reader import read_topic as read_records

    return [r.value for r in read_records(settings, name, schema, idle_timeout=idle)]


def wait_for_scored(settings: Settings, pair_ids: set[str], timeout: float = 300) -> list[dict]:
    """Read prefs.scored until every pair id has appeared (or fail with what is missing)."""
    import time

    from streams.kafka.reader import TopicReader

    seen: list[dict] = []
    ids: set[str] = set()
    deadline = time.monotonic() + timeout
    with TopicReader(settings.topic("prefs.scored"), "ScoredPair", settings) as reader:
        for record in reader.decoded(idle_timeout=timeout, skip_undecodable=False):
            rec = record.value
            rec["_partition"], rec["_offset"] = record.partition, record.offset
            seen.append(rec)
            ids.add(rec["pair"]["pair_id"])
            if pair_ids <= ids or time.monotonic() > deadline:
                break
    missing = pair_ids - ids
    assert not missing, f"{len(missing)} pairs never reached prefs.scored, e.g. {sorted(missing)[:3]}"
    return seen


def objective_pairs(n: int, seed: int = 0) -> list[dict]:
    """Math pairs with known answers; every fourth has its label flipped (chosen is the wrong one)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(3, 99), rng.randint(3, 99)
        right, wrong = f"{a} * {b} = {a * b}.", f"{a} * {b} = {a * b + rng.randint(1, 9)}."
        flipped = i % 4 == 3
        out.append({"pair_id": f"obj-{seed}-{i}", "prompt": f"What is {a} * {b}?",
                    "chosen": wrong if flipped else right, "rejected": right if flipped else wrong,
                    "metadata": {"truth": "rejected" if flipped else "chosen"}})
    return out


def processes_with_env(name: str, value: str) -> list[str]:
    """Command lines of live processes whose environment has NAME=VALUE (what a test's services carry)."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                state = next((ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State:")), "")
                if "zombie" not in state:
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


class FakeMessage:
    """A consumed Kafka record as confluent-kafka hands it over, for driving the Pipeline without a broker."""

    def __init__(self, value: bytes | None, key: bytes | None = None, headers: list | None = None,
                 topic: str = "prefs.raw", partition: int = 0, offset: int = 0) -> None:
        self._v, self._k, self._h, self._t, self._p, self._o = value, key, headers, topic, partition, offset

    def value(self) -> bytes | None:
        return self._v

    def key(self) -> bytes | None:
        return self._k

    def headers(self) -> list | None:
        return self._h

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def error(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


class FakeRedis:
    """The few Redis calls the pipeline makes (SET NX + GET in a pipeline, HGETALL, and ingest's one EVAL:
    delete a key while it holds a given value), in memory."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self._ops: list = []

    def pipeline(self, transaction: bool = False) -> FakeRedis:
        self._ops = []
        return self

    def set(self, key: str, value: str, nx: bool = False, ex: int | None = None) -> None:
        self._ops.append(("set", key, value.encode(), nx))

    def get(self, key: str) -> None:
        self._ops.append(("get", key))

    def eval(self, script: str, numkeys: int, key: str, value: str) -> None:
        from streams.runtime.processors.ingest import RELEASE_SCRIPT

        assert script == RELEASE_SCRIPT and numkeys == 1, "FakeRedis only knows ingest's release script"
        self._ops.append(("release", key, value.encode()))

    def execute(self) -> list:
        out = []
        for op in self._ops:
            if op[0] == "set":
                if not (op[3] and op[1] in self.data):
                    self.data[op[1]] = op[2]
                out.append(True)
            elif op[0] == "release":
                held = self.data.get(op[1]) == op[2]
                if held:
                    del self.data[op[1]]
                out.append(int(held))
            else:
                out.append(self.data.get(op[1]))
        return out

    def hgetall(self, key: str) -> dict:
        return dict(self.hashes.get(key, {}))


class FakeEmbedder:
    """Deterministic unit vectors from a hash of the text: enough for the labeler and retrieval to run."""

    dim = 16

    def embed(self, texts):  # -> np.ndarray (numpy is imported lazily, as in the rest of this module)
        import hashlib

        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode("utf-8", "backslashreplace")).digest()[:4], "little")
            v = np.random.default_rng(seed).normal(size=self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


class FakeScorer:
    """A Scorer stand-in: p from the response lengths; raises on any batch holding a pair whose chosen text is ``poison``."""

    def __init__(self, poison: str | None = None) -> None:
        self.poison, self.calls = poison, 0

    def score(self, pairs: list[dict]) -> list[dict]:
        import math

        self.calls += 1
        if self.poison is not None and any(p["chosen"] == self.poison for p in pairs):
            raise RuntimeError("the tokenizer choked on this input")
        out = []
        for p in pairs:
            rc, rr = len(p["chosen"]) / 10, len(p["rejected"]) / 10
            out.append({"reward_chosen": rc, "reward_rejected": rr, "p": 1 / (1 + math.exp(rr - rc)),
                        "model_version": "bootstrap", "gold_reward_chosen": None, "gold_reward_rejected": None,
                        "gold_p": None, "gold_model_version": None, "scored_at": 0})
        return out


def fake_pipeline(scorer: FakeScorer | None = None, **worker_settings):
    """A Pipeline with fake Redis, embedder and scorer (no broker, no model): the per-record logic alone."""
    from streams.runtime.pipeline import Pipeline
    from streams.settings import WorkerSettings

    return Pipeline(Settings(), WorkerSettings(**worker_settings), FakeRedis(), scorer or FakeScorer(), FakeEmbedder())


def decoded_outputs(outputs: list) -> dict[str, list[dict]]:
    """The records of a Pipeline's outputs, decoded, by topic."""
    from schemas.wire import ValueCodec

    codec = ValueCodec()
    by_topic: dict[str, list[dict]] = {}
    schemas = {"prefs.scored": "ScoredPair", "prefs.review": "ReviewTask", "prefs.curated": "CuratedPair",
               "prefs.dlq": "DeadLetter", "prefs.deferred": "ScoredPair"}
    for topic, _key, value, headers in outputs:
        by_topic.setdefault(topic, []).append(codec.decode(schemas[topic], value, headers, topic))
    return by_topic


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in a /metrics page whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---------------------------------------------------------------------------------------------- attacks
def vouching_pair(pair_id: str, source: str, **extra) -> bytes:
    """A pair (JSON) whose producer claims "Mars has 7 moons." is right and vouches for it with
    metadata.answer, naming ``source`` (the demo generator's, were sources trusted by name)."""
    return json.dumps({"pair_id": pair_id, "prompt": "How many moons does Mars have?", "chosen": "Mars has 7 moons.",
                       "rejected": "Mars has 2 moons.", "source": source, "metadata": {"answer": "7"},
                       "created_at": 1_780_000_000_000} | extra).encode()


def raw_announcements(settings: Settings) -> list:
    """Every record of models.versions as the broker holds it (value and headers: what an attacker can copy)."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    from streams.kafka import topics
    from streams.kafka.config import consumer_config

    consumer = Consumer(consumer_config(settings, f"raw-{time.time_ns()}"))
    consumer.assign([TopicPartition(settings.topic(topics.MODEL_VERSIONS), 0, 0)])
    out, idle = [], time.monotonic() + 3
    while time.monotonic() < idle:
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            out.append(msg)
            idle = time.monotonic() + 1
    consumer.close()
    return out


class AbortsOnce:
    """A real transactional producer whose first commit of a transaction that wrote to a topic ending in
    ``on`` fails as an abortable error would, after every record reached the broker (so the aborted
    records are there to be delivered)."""

    def __init__(self, producer, failures: list[int], on: str) -> None:
        self._producer, self._failures, self._on = producer, failures, on
        self._wrote: set[str] = set()

    def begin_transaction(self) -> None:
        self._wrote.clear()
        self._producer.begin_transaction()

    def produce(self, topic: str, **kwargs) -> None:
        if kwargs.get("value") is not None:
            self._wrote.add(topic)
        self._producer.produce(topic, **kwargs)

    def commit_transaction(self, timeout: float) -> None:
        from confluent_kafka import KafkaError, KafkaException

        if self._failures[0] > 0 and any(t.endswith(self._on) for t in self._wrote):
            self._failures[0] -= 1
            assert self._producer.flush(timeout) == 0
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "injected: commit failed", txn_requires_abort=True))
        self._producer.commit_transaction(timeout)

    def __getattr__(self, name: str):
        return getattr(self._producer, name)


def aborting_producer(failures: int, on: str = ""):
    """A ``make_producer`` for BatchTransactions: the first ``failures`` commits (of transactions writing to
    a topic ending in ``on``) fail and are aborted."""
    from streams.kafka.transactions import transactional_producer

    left = [failures]
    return lambda settings, tid: AbortsOnce(transactional_producer(settings, tid), left, on)


def raw_batch(settings: Settings, pairs: list[dict], group: str) -> tuple:
    """The pairs on prefs.raw partition 0, and a consumer of ``group`` holding that partition with them read."""
    import time

    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    from schemas.wire import ValueCodec
    from streams.kafka import topics
    from streams.kafka.config import consumer_config, producer_config

    raw = settings.topic(topics.RAW)
    codec = ValueCodec(settings.schema_registry_url)
    producer = Producer(producer_config(settings))
    for pair in pairs:
        value, headers = codec.encode("PreferencePair", pair, raw)
        producer.produce(raw, value=value, key=pair["pair_id"].encode(), headers=headers, partition=0)
    assert producer.flush(10) == 0
    consumer = Consumer(consumer_config(settings, group))
    consumer.assign([TopicPartition(raw, 0, OFFSET_BEGINNING)])
    msgs: list = []
    deadline = time.monotonic() + 20
    while len(msgs) < len(pairs) and time.monotonic() < deadline:
        msgs += [m for m in consumer.consume(len(pairs), 1.0) if not m.error()]
    assert len(msgs) == len(pairs)
    return consumer, msgs


def every_record(settings: Settings, name: str) -> list:
    """Every record of a topic as a plain read_committed consumer gets it, with no filter (on the embedded
    broker: the records of aborted transactions too)."""
    import time

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from streams.kafka.config import consumer_config

    topic = settings.topic(name)
    consumer = Consumer(consumer_config(settings, None))
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    out, last = [], time.monotonic()
    while time.monotonic() - last < 3:
        m = consumer.poll(0.2)
        if m is not None and not m.error():
            out.append(m)
            last = time.monotonic()
    consumer.close()
    return out


def run_writer(settings: Settings, until: Callable[[Any], bool], timeout: float = 40, linger: float = 1.5) -> Any:
    """A ShardWriter in a thread until ``until(writer)`` holds (or ``timeout``), then ``linger`` seconds more: a
    row that should not be there would be flushed by then. Returns the stopped writer."""
    import threading
    import time

    from streams.runtime.shard_writer import ShardWriter
    from streams.settings import WorkerSettings

    stop = threading.Event()
    writer = ShardWriter(settings, WorkerSettings(shard_max_age_s=0.5), stop)
    thread = threading.Thread(target=writer.run, name="shards", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(writer):
        time.sleep(0.2)
    time.sleep(linger)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    return writer


def aggregate_until_dead_letters(settings: Settings, redis_client: Any, n_dead: int, timeout: float = 90) -> list[dict]:
    """The aggregator in a thread until prefs.dlq holds ``n_dead`` records and a pair was verified; the dead letters."""
    import threading
    import time

    from streams.kafka import topics
    from streams.review import aggregator

    stop = threading.Event()
    th = threading.Thread(target=aggregator.run, args=(settings, redis_client, stop), daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + timeout
        while len(dead := read_topic(settings, topics.DLQ, "DeadLetter", idle=0.5)) < n_dead or not \
                read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=0.5):
            assert time.monotonic() < deadline and th.is_alive(), f"dead letters: {dead}"
    finally:
        stop.set()
        th.join(15)
    return dead
