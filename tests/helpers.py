"""Shared test helpers: running the CLI against the test stack, shared data, repeated checks."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
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
    out, used = [], set()
    for i in range(n):
        a, b = rng.randint(3, 99), rng.randint(3, 99)
        while (a, b) in used:  # a repeated question is a duplicate pair, which the worker dead-letters
            a, b = rng.randint(3, 99), rng.randint(3, 99)
        used.add((a, b))
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
    """The few Redis calls the pipeline makes (SET NX + GET in a pipeline, HGETALL, ingest's one EVAL:
    delete a key while it holds a given value, and the history's HINCRBYFLOAT + EXPIRE), in memory."""

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

    def hincrbyfloat(self, key: str, field: str, amount: float) -> None:  # streams/history.py's counts
        self._ops.append(("hincrbyfloat", key, field.encode(), amount))

    def expire(self, key: str, seconds: int) -> None:
        self._ops.append(("expire", key))

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
            elif op[0] == "hincrbyfloat":
                h = self.hashes.setdefault(op[1], {})
                h[op[2]] = str(float(h.get(op[2], b"0")) + op[3]).encode()
                out.append(float(h[op[2]]))
            elif op[0] == "expire":
                out.append(True)
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

    # FakeRedis has no hashes or sorted sets for the retrieval store: the index stays in memory.
    return Pipeline(Settings(), WorkerSettings(**({"retrieval_persist": 0} | worker_settings)), FakeRedis(),
                    scorer or FakeScorer(), FakeEmbedder())


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
    metadata.answer, naming ``source`` (the demo generator's, were sources trusted by name). The prompt names the
    pair_id: pairs with the same content under two ids would be dead-lettered as duplicates."""
    return json.dumps({"pair_id": pair_id, "prompt": f"How many moons does Mars have? ({pair_id})",
                       "chosen": "Mars has 7 moons.",
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


# ---------------------------------------------------------------------------------------------- records
def unique_pairs(n: int) -> list[dict]:
    """``n`` valid pairs whose prompts no other call shares."""
    import uuid

    from schemas.pairs import validate_pair

    tag = uuid.uuid4().hex[:6]
    return [validate_pair({"prompt": f"{tag} question {i}?", "chosen": f"answer {i}", "rejected": "no"}) for i in range(n)]


def short_pairs(n: int, tag: str) -> list[dict]:
    import random

    rng = random.Random(tag)
    # The tag is in the prompt: two calls with other tags must not send the same pair twice (a duplicate).
    return [{"pair_id": f"{tag}-{i}", "prompt": f"Say something nice about item {i} ({tag}).",
             "chosen": rng.choice(["It is lovely.", "Great item!", "Very useful."]),
             "rejected": rng.choice(["Meh.", "Bad.", "No."])} for i in range(n)]


def swapped(pairs: list[dict]) -> list[dict]:
    return [p | {"chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]


def scored_record(pair: dict, version: str, p: float = 0.3, gold_p: float | None = 0.8) -> dict:
    import time

    return {"pair": pair, "reward_chosen": 0.0, "reward_rejected": 1.0, "p": p, "model_version": version,
            "gold_reward_chosen": None, "gold_reward_rejected": None, "gold_p": gold_p, "gold_model_version": None,
            "scored_at": int(time.time() * 1000), "route": "silver", "route_reason": "test"}


def curated_record(pair: dict, version: str, split: str = "silver") -> dict:
    import time

    return {"pair": pair, "split": split, "p": 0.9, "model_version": version, "reason": "test",
            "curated_at": int(time.time() * 1000)}


def produce(settings: Settings, pairs: list[dict]) -> set[str]:
    """Publish ``pairs`` through the SDK; their pair ids."""
    from streams.sdk import PreferenceProducer

    with PreferenceProducer(settings) as producer:
        return {producer.send(p) for p in pairs}


def write_batch(settings: Settings, pairs: list[dict], version: str = "v1", abort: bool = False,
                transactional_id: str = "test-worker") -> None:
    """One worker-like transaction: a ScoredPair and a CuratedPair per pair, keyed by pair_id, encoded
    as the worker's ``Pipeline._out`` does; committed, or aborted after the records reached the broker."""
    from schemas.wire import ValueCodec
    from streams.kafka import topics
    from streams.kafka.transactions import TXN_CALL_TIMEOUT_S, transactional_producer

    codec = ValueCodec(settings.schema_registry_url)
    producer = transactional_producer(settings, f"{settings.topic_prefix}{transactional_id}")
    producer.begin_transaction()
    for pair in pairs:
        for name, schema, rec in ((topics.SCORED, "ScoredPair", scored_record(pair, version)),
                                  (topics.CURATED, "CuratedPair", curated_record(pair, version))):
            topic = settings.topic(name)
            value, headers = codec.encode(schema, rec, topic)
            producer.produce(topic, value=value, key=pair["pair_id"].encode(), headers=headers)
    assert producer.flush(TXN_CALL_TIMEOUT_S) == 0
    if abort:
        producer.abort_transaction(TXN_CALL_TIMEOUT_S)
    else:
        producer.commit_transaction(TXN_CALL_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------- shards
SHARD_TOPIC = "t.prefs.curated"


def shard_row(pair: dict, split: str) -> dict:
    """A CuratedPair as the shard writer stores it."""
    from schemas.pairs import validate_pair

    return {"pair": validate_pair({k: v for k, v in pair.items() if k != "extra"}), "split": split, "p": 0.9,
            "model_version": "v1", "reason": "test", "curated_at": 0}


def micro_batches(log: Any, recs: list[dict], size: int, first: int = 0) -> int:
    """Commit ``recs`` to the PartitionLog ``log`` in micro-batches of ``size`` as the writer does; the next offset."""
    offset = first
    for i in range(0, len(recs), size):
        rows = [(offset + j, r) for j, r in enumerate(recs[i:i + size])]
        log.append(rows, offset + len(rows))
        offset += len(rows)
    return offset


def write_shard(root: Any, split: str, pairs: list[dict], first: int | None = None, partition: int = 0) -> str:
    """Commit ``pairs`` to the shards ``root`` (a directory or a ShardStore) as the shard writer does
    (``PartitionLog.append``), at offsets from ``first`` (default: the partition's next offset). Returns
    the name of the file they went to, relative to the root."""
    from schemas.pairs import validate_pair
    from trainers.storage.shards import PartitionLog

    log = PartitionLog(root, SHARD_TOPIC, partition)
    first = log.load()["next_offset"] if first is None else first
    rows = [(first + i, {"pair": validate_pair({k: v for k, v in p.items() if k != "extra"}), "split": split,
                         "p": None, "model_version": None, "reason": "test", "curated_at": 0})
            for i, p in enumerate(pairs)]
    log.append(rows, first + len(rows))
    entry = next(e for e in log.load()["files"] if e["split"] == split and e["last_offset"] == first + len(rows) - 1)
    return entry["file"]


def run_shard_writer_until(writer: Any, until: Callable[[], bool], timeout: float = 60) -> None:
    """Run the ShardWriter ``writer`` in a thread until ``until()``, then stop it."""
    import threading
    import time

    thread = threading.Thread(target=writer.run, name="shards", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        assert thread.is_alive(), "the shard writer thread ended"
        time.sleep(0.2)
    writer.stop.set()
    thread.join(30)
    assert not thread.is_alive()


def assert_exactly_once_in_shards(settings: Settings, expected_ids: set[str]) -> None:
    """Every curated pair is in the committed shard records exactly once (waits for the writer's
    time-based append)."""
    import time
    from collections import Counter

    from trainers.storage.shards import iter_records, load_manifest

    deadline = time.monotonic() + 60
    while True:
        ids: Counter[str] = Counter(rec["pair"]["pair_id"] for _, rec in iter_records(settings.shards_dir))
        if set(ids) >= expected_ids or time.monotonic() > deadline:
            break
        time.sleep(1)
    dupes = {k: v for k, v in ids.items() if v > 1}
    assert not dupes, f"duplicated shard rows: {list(dupes.items())[:5]}"
    assert set(ids) == expected_ids, f"missing {len(expected_ids - set(ids))}, unexpected {len(set(ids) - expected_ids)}"
    assert sum(load_manifest(settings.shards_dir).totals().values()) == len(expected_ids)


# ---------------------------------------------------------------------------------------------- review
REVIEW_SECRETS = {"alice": "alice-token-0001", "bob": "bob-token-000022", "carol": "carol-token-0003",
                  "dave": "dave-token-000044", "erin": "expert-token-0005"}  # 16+ characters, as TokenBook requires
REVIEW_TOKENS = ",".join(f"{name}:{token}" for name, token in REVIEW_SECRETS.items())


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {REVIEW_SECRETS[name]}"}


def review_task(i: int, p: float = 0.3, expert: bool = False, **pair_extra) -> dict:
    """A ReviewTask of pair ``pair-<i>`` whose chosen answer is the good one."""
    from schemas.pairs import validate_pair

    pair = validate_pair({"prompt": f"Question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}",
                          "pair_id": f"pair-{i}"} | pair_extra)
    return {"task_id": f"pair-{i}", "pair": pair, "p": p, "margin": -0.5, "model_version": "bootstrap", "priority": p,
            "reason": "mispredicted", "similar": [], "expert": expert, "created_at": 0}


def annotation(t: dict, who: str, preferred: str, **extra) -> dict:
    return {"task_id": t["task_id"], "annotator": who, "preferred": preferred} | extra


def make_client(settings: Settings, **rs_fields: Any) -> Any:
    """A TestClient of the review app (``.queue`` its ReviewQueue)."""
    from fastapi.testclient import TestClient

    from streams.review.app import create_app
    from streams.settings import ReviewSettings

    # A high rate limit unless a test is about it: these tests fire requests back to back.
    rs = ReviewSettings(**({"tokens": REVIEW_TOKENS, "experts": "erin", "lease_s": 2, "rate_per_s": 1000} | rs_fields))
    app = create_app(settings, rs)
    c = TestClient(app)
    c.queue = app.state.queue
    return c


def publish(settings: Settings, schema: str, name: str, records: list[tuple[str, dict]]) -> None:
    """Write records as their one writer does: Annotations signed with the review app's key."""
    from confluent_kafka import Producer

    from schemas.wire import ValueCodec
    from streams.kafka.config import producer_config
    from streams.keys import review_keys
    from streams.review.provenance import AnnotationKeys
    from streams.settings import ReviewSettings

    codec, prod = ValueCodec(), Producer(producer_config(settings))
    keys = AnnotationKeys(review_keys(settings, ReviewSettings()))
    for key, rec in records:
        v, h = codec.encode(schema, rec, settings.topic(name))
        if schema == "Annotation":
            h = keys.headers(codec, v, h, settings.topic(name))
        prod.produce(settings.topic(name), key=key.encode(), value=v, headers=h)
    assert prod.flush(10) == 0


def publish_tasks(settings: Settings, tasks: list[dict]) -> None:
    from confluent_kafka import Producer

    from schemas.wire import ValueCodec
    from streams.kafka import topics
    from streams.kafka.config import producer_config

    codec, prod = ValueCodec(), Producer(producer_config(settings))
    for t in tasks:
        v, h = codec.encode("ReviewTask", t, settings.topic(topics.REVIEW))
        prod.produce(settings.topic(topics.REVIEW), key=t["task_id"].encode(), value=v, headers=h)
    assert prod.flush(10) == 0


@contextmanager
def running_review_app(settings: Settings, tmp_path: Path, extra_env: dict[str, str] | None = None):
    """`prefstream review` as a process on a free port; yields its URL and environment."""
    import time
    import urllib.request

    from streams.embedded.process import free_port

    port = free_port()
    # At the default per-token rate limit: the simulated annotators wait out its 429s like real clients.
    env = settings_env(settings) | {"PREFSTREAM_REVIEW_TOKENS": REVIEW_TOKENS, "PREFSTREAM_REVIEW_EXPERTS": "erin"} | (
        extra_env or {})
    log = tmp_path / "review.log"
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "review", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
    try:
        yield url, env
    finally:
        proc.terminate()
        proc.wait(20)


def annotator_get(url: str) -> bytes:
    """GET as a signed-in annotator: /stats and /api/stats need a token."""
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {REVIEW_SECRETS['dave']}"})
    return urllib.request.urlopen(req).read()


def wait_pending(url: str, n: int) -> None:
    """Until the review app's queue holds ``n`` pending tasks."""
    import time

    deadline = time.monotonic() + 60
    while json.loads(annotator_get(url + "/api/stats"))["pending"] < n:
        assert time.monotonic() < deadline, "the feeder did not queue the tasks"
        time.sleep(0.3)


# ---------------------------------------------------------------------------------------------- processes
def kill9(server: Any) -> None:
    """SIGKILL the ServerProcess ``server`` and wait until it is gone."""
    import signal
    import time

    pid = server.pid()
    assert pid is not None, f"{server.name} does not run"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.pid() is None


def free_object_store_port() -> int:
    """A base port whose block (it, the next three, each + 10000) is free."""
    import random

    from streams.embedded.objectstore import ObjectStorePorts
    from streams.embedded.process import port_is_free

    while True:
        port = random.randint(20000, 55000)
        if all(port_is_free("127.0.0.1", p) for p in ObjectStorePorts.from_s3_port(port).all().values()):
            return port


class Up:
    """`prefstream up --plain` as a user runs it, its output in ``log``."""

    def __init__(self, settings: Settings, review_port: int, log: Path, *args: str) -> None:
        env = child_env(settings) | {"PREFSTREAM_WORKER_SHARD_MAX_AGE_S": "1"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "up", "--plain", "--refresh", "1",
                                      "--review-port", str(review_port), *args], env=env, cwd=ROOT,
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def wait_for(self, pattern: str, timeout: float = 240) -> Any:
        import re
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.log.read_text(errors="replace")))
            if found:
                return found[-1]
            assert self.proc.poll() is None, f"up exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def interrupt(self) -> int:
        import signal

        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(120)


def run_up_once(settings: Settings, log: Path, pairs: list[dict], expect_scored: int, *args: str) -> Up:
    """One `up ARGS` until it has scored ``expect_scored`` pairs, then Ctrl-C."""
    import re

    from streams.embedded.process import free_port

    up = Up(settings, free_port(), log, *args)
    try:
        up.wait_for(r"up in \d+ s · review app http://127\.0\.0\.1:\d+")
        up.wait_for(r"status workers=1/1 ")
        produce(settings, pairs)
        up.wait_for(rf"status workers=1/1 scored={expect_scored} .*routes\[.+\].*serving\[current=bootstrap")
        # The worker says which partitions it holds, in the status line and in `stack status`.
        up.wait_for(r"partitions\[worker 1: 0,1,2,3,4,5\b")
        status = run_cli(["stack", "status"], settings, check=False)
        assert re.search(r"1\s.*/metrics\s.*0,1,2,3,4,5", status.stdout), status.stdout
    finally:
        code = up.interrupt()
    assert code == 0, log.read_text()[-3000:]
    return up


# A retrain small enough for a test: a few steps of small batches of short sequences, no INT8 export.
FAST_RETRAIN = dict(max_steps=12, batch_size=8, max_length=64, learning_rate=1e-4, quantize=False)


def distinct_pairs(pairs: Iterable[dict], n: int) -> list[dict]:
    """The first ``n`` of ``pairs`` whose content differs: a worker dead-letters a repeat as a duplicate
    (streams/runtime/curation/dedupe.py), and the demo generator draws from small template pools."""
    from schemas.pairs import validate_pair
    from streams.runtime.curation.dedupe import content_key

    seen: set[str] = set()
    out = []
    for p in pairs:
        key = content_key(validate_pair(p))[0]
        if key not in seen:
            seen.add(key)
            out.append(p)
        if len(out) == n:
            break
    return out


def routes_counted(settings: Settings, minutes: int = 120) -> Counter:
    """The route kinds the workers counted for the stats page's charts (streams/history.py) in the last ``minutes``."""
    import redis

    from streams import history

    buckets = history.read(redis.Redis.from_url(settings.redis_url), settings.topic_prefix, history.ROUTES, minutes)
    return sum((Counter({k: int(v) for k, v in b.counts.items()}) for b in buckets), Counter())
