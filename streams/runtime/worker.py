"""`prefstream worker`: ingest -> score -> label -> route in one consume-transform-produce loop.

Each micro-batch is one Kafka transaction: the outputs (prefs.scored, prefs.review, prefs.curated,
prefs.dlq) and the input offsets commit together or not at all, so a worker killed at any moment
and restarted leaves every pair exactly once in the outputs (read_committed). Why confluent-kafka
transactions and not Faust: docs/design.md, "Delivery and failure".

Several workers in the same group share the partitions of prefs.raw: scaling is running more.
Between raw batches the worker's second look (deferred.py) scores again the review candidates the
review budget deferred to prefs.deferred, in transactions of its own; and its error-driven expansion
(expansion.py) sends the near neighbours of pairs whose human verdict corrected the model back to review.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as KafkaErrorCode

from schemas.wire import ValueCodec
from streams import history
from streams.exceptions import StageFailedError
from streams.kafka import topics
from streams.kafka.config import consumer_config
from streams.kafka.transactions import BatchTransactions, rewind
from streams.keys import announce_verifiers
from streams.runtime import metrics, sandbox
from streams.runtime.announcements import AnnouncementGate
from streams.runtime.assignment import Assignment
from streams.runtime.deferred import SecondLook
from streams.runtime.expansion import Expansion
from streams.runtime.isolation import REDONE
from streams.runtime.pipeline import Pipeline
from streams.runtime.processors.scorer import (
    Loaded,
    ModelSlot,
    Placement,
    Scorer,
    bootstrap_model,
    load_announced,
    placement,
)
from streams.settings import WORKER_MAX_POLL_INTERVAL_MS, Settings, WorkerSettings
from trainers.storage.registry import BOOTSTRAP_VERSION

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = 1.0
# Batches in a row that may fail to commit before /readyz turns false.
NOT_READY_AFTER = 3
# Consumer errors that mean the broker cannot be reached; after BROKER_AWAY_S of them /readyz turns
# false until a metadata request (every BROKER_PROBE_S) answers again.
BROKER_AWAY_CODES = {KafkaErrorCode._ALL_BROKERS_DOWN, KafkaErrorCode._TRANSPORT, KafkaErrorCode._RESOLVE}
BROKER_AWAY_S = 10.0
BROKER_PROBE_S = 5.0
WORKER_SOCKET_TIMEOUT_MS = 15000
VERSIONS_DRAIN_S = 1.0
IDLE_POLL_S = 0.5  # how long an idle worker blocks for a record before checking its stop flag
LAG_EXPORT_S = 1.0  # how often the per-partition lag gauges are refreshed (local to the client: cheap)


class VersionWatcher:
    """Follows models.versions and offers each new version to its slot (loaded in this thread).

    Only announcements the gate admits are offered (announcements.py: signed by the announcer's key,
    not stale, the manifest's role, never older than the serving version unless a rollback).
    """

    def __init__(self, settings: Settings, slots: dict[str, ModelSlot]) -> None:
        self.settings, self.slots = settings, slots
        self.topic = settings.topic(topics.MODEL_VERSIONS)
        self.codec = ValueCodec(settings.schema_registry_url)
        # At start: a worker without the announcer's public key could serve nothing but the bootstrap model.
        self.gate = AnnouncementGate(announce_verifiers(settings), settings.model_store())
        # Not a background consumer: its fetch wait is part of every hot-swap's delay (announcement to
        # first pair scored by the new version), and a fetch every 100 ms of one partition costs nothing.
        self.consumer = Consumer(consumer_config(settings, f"prefstream-versions-{socket.gethostname()}-{os.getpid()}"))
        self.consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        self.stop = threading.Event()

    def _decode(self, msg: Any) -> dict | None:
        """The announcement in ``msg`` for one of this worker's roles, if a key it knows signed it."""
        try:
            rec = self.codec.decode("ModelVersion", msg.value(), msg.headers(), self.topic)
        except Exception as exc:  # a bad announcement must not stop the watcher
            log.error("unreadable record on %s at offset %s: %s", self.topic, msg.offset(), exc)
            return None
        return rec if rec["role"] in self.slots and self.gate.signed(rec, msg.headers()) else None

    def _offer(self, rec: dict) -> None:
        slot = self.slots[rec["role"]]
        upcoming = slot.pending or slot.serving
        if self.gate.admit(rec, upcoming.version if upcoming else None):
            slot.offer(rec)

    def drain(self) -> None:
        """Read what is there now; offer only the newest signed record per role (start-up)."""
        signed: dict[str, list[Mapping[str, Any]]] = {}
        deadline = time.monotonic() + VERSIONS_DRAIN_S
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            deadline = time.monotonic() + VERSIONS_DRAIN_S
            if rec := self._decode(msg):
                signed.setdefault(rec["role"], []).append(rec)
        for records in signed.values():
            if (chosen := self.gate.choose(records)) is not None:
                self._offer(dict(chosen))

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            if rec := self._decode(msg):
                self._offer(rec)
        self.consumer.close()


class BatchSizer:
    """How many records the next micro-batch may take: what the models score in ``target_s``.

    Measured on the previous batches (a moving average of pairs/s), so MiniLM fills max_batch
    while a multi-billion-parameter model on CPU takes a few pairs per batch and stays well within
    max.poll.interval. The first batch is small because nothing has been measured yet.
    """

    START = 8

    def __init__(self, max_batch: int, target_s: float) -> None:
        self.max_batch, self.target_s = max_batch, target_s
        self.rate: float | None = None

    @property
    def limit(self) -> int:
        if self.rate is None:
            return min(self.START, self.max_batch)
        return max(1, min(self.max_batch, int(self.rate * self.target_s)))

    def observe(self, records: int, seconds: float) -> None:
        if records <= 0 or seconds <= 0:
            return
        rate = records / seconds
        self.rate = rate if self.rate is None else 0.5 * self.rate + 0.5 * rate


def next_batch(consumer: Consumer, max_batch: int, max_wait_s: float, idle_s: float = IDLE_POLL_S,
               on_idle: Callable[[], Any] | None = None) -> list[Any]:
    """The next micro-batch: what is already fetched, else block (up to ``idle_s``) for the first record
    (``on_idle`` is called first: nothing is waiting).

    After the first record, wait up to ``max_wait_s`` for more only while the batch is short.
    librdkafka's ``consume(n, timeout)`` waits the whole timeout unless n records come, so a fixed
    timeout would delay every small batch by it. Errors other than end-of-partition are logged.
    """
    msgs = consumer.consume(max_batch, 0)
    if not msgs:
        if on_idle is not None:
            on_idle()
        msgs = consumer.consume(1, idle_s)
        if msgs and max_batch > 1:
            msgs += consumer.consume(max_batch - 1, max_wait_s)
    elif len(msgs) < max_batch and max_wait_s > 0:
        msgs += consumer.consume(max_batch - len(msgs), max_wait_s)
    for m in msgs:
        if (err := m.error()) and err.code() != KafkaErrorCode._PARTITION_EOF:
            log.warning("consumer error: %s", err.str())
    return [m for m in msgs if not m.error()]


def build_scorer(settings: Settings, wsettings: WorkerSettings, where: Placement) -> tuple[Scorer, dict[str, ModelSlot]]:
    """The scorer's two slots, loading new versions on ``where``'s device."""
    # An announced version is resolved by name in this worker's own model store (see resolve_announced).
    store = settings.model_store()
    store.check()  # an unreachable bucket or refused credentials stop the worker at start, with the fix
    loader = lambda rec: load_announced(rec, threads=wsettings.threads or None, store=store, where=where)  # noqa: E731
    current, gold = ModelSlot("current", loader), ModelSlot("gold", loader)
    return Scorer(current, gold), {"current": current, "gold": gold}


class Worker:
    def __init__(self, settings: Settings, wsettings: WorkerSettings) -> None:
        self.settings, self.wsettings = settings, wsettings
        # The device and dtype are checked first: CUDA asked for without a GPU stops the worker here.
        self.where = placement(wsettings.device, wsettings.dtype, wsettings.token_budget)
        log.info("reward models on %s in %s", self.where.device, self.where.dtype)
        self.stop = threading.Event()
        self.ready = self.started = False
        self.failed_batches = 0
        self.batch_since: float | None = None  # when the batch in progress started
        # When the main loop last turned, and what it is doing: work between batches (the second look, the
        # expansion, anchoring) that hangs stops the batches too, and only this tells.
        self.loop_at, self.loop_stage, self.loop_dumped = time.monotonic(), "starting", False
        self.broker_away_since: float | None = None  # first consumer error saying the broker is away
        self.last_probe = 0.0
        self.last_error = ""
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.scorer, self.slots = build_scorer(settings, wsettings, self.where)
        self.watcher = VersionWatcher(settings, self.slots)
        self.counts: Counter[str] = Counter()
        self.transactional_id = f"prefstream-{settings.topic_prefix}{wsettings.group}-{wsettings.worker_id}"
        self.assignment = Assignment(f"{settings.topic_prefix}{wsettings.group}")
        self.lag_at = 0.0  # when the per-partition lag was last exported

    def _start_models(self) -> None:
        self.watcher.drain()
        self.scorer.swap_if_ready()
        if self.slots["current"].serving is None:
            # Stage 1: before any version exists the untrained default serves, stamped 'bootstrap'.
            self.slots["current"].serving = Loaded(
                bootstrap_model(self.wsettings.bootstrap_max_length, self.wsettings.threads or None, self.where),
                BOOTSTRAP_VERSION)
        self.scorer.export_versions()
        threading.Thread(target=self.watcher.run, name="versions", daemon=True).start()

    def _consumer(self) -> Consumer:
        # The topic prefix isolates deployments sharing a cluster; their groups must be isolated too.
        # A micro-batch on a busy CPU can take longer than the 10 s readers use; a worker that overruns
        # max.poll.interval leaves its group, and on Tansu it was seen never to rejoin (bench, 2 workers).
        # error_cb: librdkafka reports an unreachable broker as a global error, served on consume.
        # socket.timeout.ms: a broker that holds the connection open but never answers (hung, or frozen
        # in the outage test) is only seen when a fetch times out; at librdkafka's 60 s an idle worker
        # took 81 s to turn not-ready, at 15 s (still 150 times the fetch wait) 36 s.
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.topic_prefix}{self.wsettings.group}")
                            | {"max.poll.interval.ms": WORKER_MAX_POLL_INTERVAL_MS,
                               "socket.timeout.ms": WORKER_SOCKET_TIMEOUT_MS, "error_cb": self._consumer_error})
        self.assignment.subscribe(consumer, [self.settings.topic(topics.RAW)])  # logs and exports each rebalance
        return consumer

    def _start_shard_writer(self) -> threading.Thread | None:
        if not self.wsettings.shard_writer:
            return None
        from streams.runtime.shard_writer import ShardWriter

        thread = threading.Thread(target=ShardWriter(self.settings, self.wsettings, self.stop).run, name="shards",
                                  daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        pipeline = Pipeline(self.settings, self.wsettings, self.redis, self.scorer)
        self._start_models()
        # What start-up loaded (models, tokenizers, taxonomy) lives as long as the worker; frozen, it is
        # no longer rescanned by every full collection of the objects each batch makes (a 1,000-pair
        # run: 1.30 s in the collector against 1.56 s, start-up included).
        gc.collect()
        gc.freeze()
        # Probe the code sandbox now, so its state is logged at start and shown on /metrics; without
        # one, code pairs take the model route (untrusted code never runs unsandboxed).
        sandbox.available()
        # Every output topic is marked, so readers drop the records of batches that did not commit
        # (streams/kafka/committed.py).
        txn = BatchTransactions(self.settings, self.transactional_id, stop=self.stop,
                                marked=pipeline.out_topics.values())
        consumer = self._consumer()
        # Deferred review candidates (the review budget's) are looked at again between raw batches.
        second_look = SecondLook(self.settings, self.wsettings, pipeline, self.transactional_id, self.stop)
        # Human verdicts that corrected the model send its near neighbours back to review (error-driven expansion).
        expansion = Expansion(self.settings, self.wsettings, pipeline, self.transactional_id, self.stop)
        shard_thread = self._start_shard_writer()
        sizer = BatchSizer(self.wsettings.max_batch, self.wsettings.batch_target_s)
        self.started = True
        self._set_ready()
        log.info("worker %s consuming %s", self.transactional_id, self.settings.topic(topics.RAW))
        try:
            while not self.stop.is_set():
                self._turn("polling prefs.raw")
                txn.poll()
                # Nothing waiting: a markers-only transaction lets readers take the last batch's outputs
                # now rather than with the next batch (a no-op unless that batch had outputs).
                msgs = next_batch(consumer, sizer.limit, self.wsettings.max_wait_ms / 1000,
                                  on_idle=lambda: txn.anchor(consumer))
                # Between batches, and after the wait for records: a version parked while this worker
                # waited scores the batch that ended the wait.
                self.scorer.swap_if_ready()
                self._probe_broker(consumer)
                if msgs and self._process_batch(pipeline, txn, consumer, msgs, sizer):
                    self._count(msgs)
                if time.monotonic() - self.lag_at >= LAG_EXPORT_S:
                    self.assignment.update_lag(consumer)
                    self.lag_at = time.monotonic()
                self._turn("the second look")
                second_look.step(sizer.limit)
                self._turn("the error-driven expansion")
                expansion.step()
        finally:
            self.started = False
            self._set_ready()
            self.watcher.stop.set()
            if not txn.failures:  # (a broker that is away would only delay the stop)
                txn.anchor(consumer)  # the last batch's rows are decided before the worker is gone
            consumer.close()  # leave the group now rather than after a session timeout
            second_look.close()
            expansion.close()
            if shard_thread is not None:
                shard_thread.join(timeout=30)

    def _consumer_error(self, err: Any) -> None:
        if err.code() in BROKER_AWAY_CODES and self.broker_away_since is None:
            self.broker_away_since = time.monotonic()

    def _probe_broker(self, consumer: Consumer) -> None:
        """While the broker seemed away, ask it for metadata now and then; an answer clears it."""
        now = time.monotonic()
        if self.broker_away_since is None or now - self.last_probe < BROKER_PROBE_S:
            self._set_ready()
            return
        self.last_probe = now
        try:
            consumer.list_topics(self.settings.topic(topics.RAW), timeout=2)
        except KafkaException:
            self._set_ready()
            return
        self.broker_away_since = None
        log.info("the broker at %s answers again", self.settings.bootstrap)
        self._set_ready()

    def is_ready(self) -> bool:
        """What /readyz answers: running, fewer than NOT_READY_AFTER failed batches in a row, and no
        batch stuck for stalled_batch_s (an orchestrator then stops counting on it; the log says why)."""
        now = time.monotonic()
        stalled = self.batch_since is not None and now - self.batch_since > self.wsettings.stalled_batch_s
        stuck = self.started and self.batch_since is None and now - self.loop_at > self.wsettings.stalled_batch_s
        if stuck and not self.loop_dumped:  # asked by /readyz (another thread): say where the loop is, once
            self.loop_dumped = True
            log.error("not ready: the main loop has been in %s for %.0f s; every thread's stack follows",
                      self.loop_stage, now - self.loop_at)
            faulthandler.dump_traceback(all_threads=True)
        stalled = stalled or stuck
        away = self.broker_away_since is not None and now - self.broker_away_since > BROKER_AWAY_S
        ready = self.started and self.failed_batches < NOT_READY_AFTER and not stalled and not away
        metrics.READY.set(1 if ready else 0)
        return ready

    def _set_ready(self) -> None:
        """Follow is_ready, logging each change with its reason."""
        was, now = self.ready, self.is_ready()
        if was and not now:
            # Stopping is not a fault: said at info, so a clean shutdown logs no error.
            log.log(logging.ERROR if self.started else logging.INFO, "not ready: %s", self._not_ready_reason())
        elif now and not was and self.counts["batches"]:
            log.info("ready again")
        self.ready = now

    def _turn(self, stage: str) -> None:
        self.loop_at, self.loop_stage, self.loop_dumped = time.monotonic(), stage, False

    def _not_ready_reason(self) -> str:
        if not self.started:
            return "the worker is stopping"
        if self.broker_away_since is not None:
            return f"the broker at {self.settings.bootstrap} cannot be reached"
        if self.batch_since is not None:
            return f"a micro-batch has run for more than {self.wsettings.stalled_batch_s:.0f} s"
        if time.monotonic() - self.loop_at > self.wsettings.stalled_batch_s:
            return f"the main loop has been in {self.loop_stage} for more than {self.wsettings.stalled_batch_s:.0f} s"
        return f"{self.failed_batches} batches in a row did not commit; the last because {self.last_error}"

    def _process_batch(self, pipeline: Pipeline, txn: BatchTransactions, consumer: Consumer, msgs: list[Any],
                       sizer: BatchSizer) -> bool:
        """Process and commit one micro-batch; False when it was rolled back to be done again."""
        self.batch_since = time.monotonic()
        try:
            ok = self._try_batch(pipeline, txn, consumer, msgs, sizer)
        finally:
            self.batch_since = None
        self.failed_batches = 0 if ok else self.failed_batches + 1
        self.last_error = "" if ok else (txn.last_error or self.last_error)
        self._set_ready()
        return ok

    def _try_batch(self, pipeline: Pipeline, txn: BatchTransactions, consumer: Consumer, msgs: list[Any],
                   sizer: BatchSizer) -> bool:
        try:
            started = time.perf_counter()
            pipeline.take_routed()  # what an earlier try of a batch routed never committed
            try:
                outputs = pipeline.process(msgs)
            except REDONE:
                raise
            except Exception:  # a bug met by some record: find it, never exit because of one
                log.exception("a batch of %d failed outside the per-record stages; processing it record by record",
                              len(msgs))
                outputs = pipeline.process_each(msgs)
            sizer.observe(len(msgs), time.perf_counter() - started)
            with metrics.STAGE_SECONDS.labels("commit").time():
                committed = txn.commit(consumer, outputs, msgs)  # on failure: recovered and rewound
            if not committed:
                time.sleep(RETRY_BACKOFF_S)
                return False
        except (redis.RedisError, OSError, StageFailedError, KafkaException) as exc:
            # Infrastructure, or a stage failing for every record (a broken model): the data is not at
            # fault, so the batch is retried rather than dead-lettered.
            self.last_error = str(exc)
            log.warning("batch failed (%s); retrying after %.0f s", exc, RETRY_BACKOFF_S)
            rewind(consumer, self.stop)
            time.sleep(RETRY_BACKOFF_S)
            return False
        for topic, *_ in outputs:
            metrics.RECORDS_OUT.labels(topic).inc()
        history.add(self.redis, self.settings.topic_prefix, history.ROUTES, pipeline.take_routed())
        return True

    def _count(self, msgs: list[Any]) -> None:
        now = time.time()
        for m in msgs:
            ts = m.timestamp()[1]
            if ts > 0:
                metrics.LATENCY.observe(max(0.0, now - ts / 1000))
        self.counts["batches"] += 1
        self.counts["records"] += len(msgs)


def run_worker(settings: Settings, wsettings: WorkerSettings) -> None:
    from streams.runtime.health import serve

    # The tokenizers' own thread pool would compete with the model's threads for the worker's cores
    # on every small batch (one run on 2 cores: the score stage took 7% longer with it); the model parallelises.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if wsettings.threads:
        import torch

        torch.set_num_threads(wsettings.threads)  # torch scoring and the embedder; ONNX sessions get it per model
    if os.environ.get("PREFSTREAM_WORKER_TRUSTED_SOURCES"):
        log.warning("PREFSTREAM_WORKER_TRUSTED_SOURCES is not read: a source name proves nothing. Give each producer "
                    "that may vouch for its pairs a key (PREFSTREAM_WORKER_PRODUCER_KEYS, docs/operations.md)")
    worker = Worker(settings, wsettings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop.set())
    server = serve(wsettings.health_host, wsettings.health_port, alive=lambda: not worker.stop.is_set(),
                   ready=worker.is_ready) if wsettings.health_port else None
    try:
        worker.run()
    finally:
        if server is not None:
            server.shutdown()
