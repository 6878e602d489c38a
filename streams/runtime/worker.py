"""`prefstream worker`: ingest -> score -> label -> route in one consume-transform-produce loop.

Each micro-batch is one Kafka transaction: the outputs (prefs.scored, prefs.review, prefs.curated,
prefs.dlq) and the input offsets commit together or not at all, so a worker killed at any moment
and restarted leaves every pair exactly once in the outputs (read_committed). Why confluent-kafka
transactions and not Faust: docs/design.md, "Delivery and failure".

Several workers in the same group share the partitions of prefs.raw: scaling is running more.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka import KafkaError as KafkaErrorCode

from schemas.pairs import prompt_text
from schemas.wire import ValueCodec
from streams.exceptions import BrokerError
from streams.kafka import topics
from streams.kafka.config import consumer_config
from streams.kafka.transactions import TXN_CALL_TIMEOUT_S, commit_batch, rewind, transactional_producer
from streams.runtime import metrics
from streams.runtime.processors.embedder import Embedder
from streams.runtime.processors.ingest import Ingestor
from streams.runtime.processors.labeler import Labeler, LLMLabeler
from streams.runtime.processors.retrieval import NeighbourIndex
from streams.runtime.processors.router import RouterPolicy, route
from streams.runtime.processors.scorer import Loaded, ModelSlot, Scorer, bootstrap_model, load_announced
from streams.runtime.processors.verifiers import verify_batch
from streams.settings import Settings, WorkerSettings
from trainers.registry import BOOTSTRAP_VERSION

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = 1.0
WORKER_MAX_POLL_INTERVAL_MS = 60000
VERSIONS_DRAIN_S = 1.0
IDLE_POLL_S = 0.5  # how long an idle worker blocks for a record before checking its stop flag
# Review priority is p plus the pair's age as a tie-break: created_at (epoch ms, ~1.7e12) divided by
# this stays below 1e-3, so it never reorders pairs whose p differ by more than that.
PRIORITY_AGE_SCALE = 1e16


class Pipeline:
    """The per-batch logic, free of Kafka plumbing (so it can be tested and benchmarked alone)."""

    def __init__(self, settings: Settings, wsettings: WorkerSettings, redis_client: Any, scorer: Scorer,
                 embedder: Embedder | None = None) -> None:
        self.settings, self.wsettings = settings, wsettings
        self.codec = ValueCodec(settings.schema_registry_url)
        self.ingestor = Ingestor(self.codec, redis_client, wsettings.dedupe_ttl_s, key_prefix=settings.topic_prefix)
        self.embedder = embedder or Embedder(threads=wsettings.threads or None, precision=wsettings.embedder_precision)
        labeler = Labeler(self.embedder, redis=redis_client)
        self.labeler: Any = labeler
        if wsettings.llm_url:
            key = wsettings.llm_api_key.get_secret_value() if wsettings.llm_api_key else None
            self.labeler = LLMLabeler(wsettings.llm_url, wsettings.llm_model, labeler, key)
        self.index = NeighbourIndex(self.embedder.dim)
        self.scorer = scorer
        self.policy = RouterPolicy(wsettings.tau, wsettings.gold_agree, wsettings.flip_below)
        self.out_topics = {name: settings.topic(name) for name in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ)}

    def _out(self, name: str, schema: str, key: bytes | None, record: dict) -> tuple[str, bytes | None, bytes, list]:
        topic = self.out_topics[name]
        value, headers = self.codec.encode(schema, record, topic)
        return topic, key, value, headers

    def process(self, msgs: list[Any]) -> list[tuple[str, bytes | None, bytes, list]]:
        with metrics.STAGE_SECONDS.labels("ingest").time():
            results = [(m, self.ingestor.decode(m)) for m in msgs]
            self.ingestor.dedupe(results)
        outputs = []
        pairs = []
        for m, r in results:
            metrics.RECORDS_IN.labels(m.topic()).inc()
            if r.dead_letter is not None:
                metrics.DLQ.labels(r.dead_letter["reason"]).inc()
                outputs.append(self._out(topics.DLQ, "DeadLetter", m.key(), r.dead_letter))
            elif r.duplicate:
                metrics.DUPLICATES.inc()
            else:
                pairs.append(r.pair)
        if not pairs:
            return outputs
        with metrics.STAGE_SECONDS.labels("score").time():
            scores = self.scorer.score(pairs)
        with metrics.STAGE_SECONDS.labels("label").time():
            disagreement = [abs(s["p"] - s["gold_p"]) if s["gold_p"] is not None else None for s in scores]
            self.labeler.label(pairs, disagreement)
            prompts = [prompt_text(p) for p in pairs]
            emb = self.embedder.embed(prompts)
        with metrics.STAGE_SECONDS.labels("verify").time():
            verdicts = verify_batch(pairs)
        with metrics.STAGE_SECONDS.labels("route").time():
            self._route(pairs, scores, verdicts, prompts, emb, outputs)
        return outputs

    def _route(self, pairs: list[dict], scores: list[dict], verdicts: list, prompts: list[str], emb: np.ndarray,
               outputs: list) -> None:
        """Route each scored pair and append its output records; then index the batch for retrieval."""
        now = int(time.time() * 1000)
        for i, (pair, score) in enumerate(zip(pairs, scores, strict=True)):
            decision = route(score["p"], score["gold_p"], verdicts[i], self.policy)
            metrics.ROUTES.labels(decision.kind, decision.reason.split(":")[0][:40]).inc()
            key = pair["pair_id"].encode()
            outputs.append(self._out(topics.SCORED, "ScoredPair", key,
                                     {"pair": pair, **score, "route": decision.kind, "route_reason": decision.reason}))
            if decision.kind == "review":
                similar = [{"pair_id": n.pair_id, "prompt": n.prompt, "chosen": n.chosen, "rejected": n.rejected,
                            "label_source": n.label_source, "similarity": n.similarity}
                           for n in self.index.search(emb[i], decision.k, exclude=pair["pair_id"])]
                task = {"task_id": pair["pair_id"], "pair": pair, "p": score["p"],
                        "margin": score["reward_chosen"] - score["reward_rejected"], "model_version": score["model_version"],
                        # Severity first: lower p is served first; ties by age (created_at in ms, scaled down).
                        "priority": score["p"] + pair["created_at"] / PRIORITY_AGE_SCALE, "reason": decision.reason,
                        "similar": similar, "expert": False, "created_at": now}
                outputs.append(self._out(topics.REVIEW, "ReviewTask", key, task))
            elif decision.kind != "dropped":
                trained = dict(pair)
                if decision.flip:
                    trained["chosen"], trained["rejected"] = pair["rejected"], pair["chosen"]
                p_train = 1 - score["p"] if decision.flip else score["p"]
                outputs.append(self._out(topics.CURATED, "CuratedPair", key, {
                    "pair": trained, "split": decision.kind, "p": p_train, "model_version": score["model_version"],
                    "reason": decision.reason, "curated_at": now}))
        self.index.add(emb, [(p["pair_id"], prompts[i], p["chosen"], p["rejected"], p["label_source"])
                             for i, p in enumerate(pairs)])


class VersionWatcher:
    """Follows models.versions and offers each new version to its slot (loaded in this thread)."""

    def __init__(self, settings: Settings, slots: dict[str, ModelSlot]) -> None:
        self.settings, self.slots = settings, slots
        self.topic = settings.topic(topics.MODEL_VERSIONS)
        self.codec = ValueCodec(settings.schema_registry_url)
        self.consumer = Consumer(consumer_config(settings, f"prefstream-versions-{socket.gethostname()}-{os.getpid()}",
                                                 background=True))
        self.consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        self.stop = threading.Event()

    def _decode(self, msg: Any) -> dict | None:
        try:
            return self.codec.decode("ModelVersion", msg.value(), msg.headers(), self.topic)
        except Exception as exc:  # a bad announcement must not stop the watcher
            log.error("unreadable record on %s at offset %s: %s", self.topic, msg.offset(), exc)
            return None

    def drain(self) -> None:
        """Read what is there now; offer only the latest record per role (start-up)."""
        latest: dict[str, dict] = {}
        deadline = time.monotonic() + VERSIONS_DRAIN_S
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            deadline = time.monotonic() + VERSIONS_DRAIN_S
            if (rec := self._decode(msg)) and rec["role"] in self.slots:
                latest[rec["role"]] = rec
        for role, rec in latest.items():
            self.slots[role].offer(rec)

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            if (rec := self._decode(msg)) and rec["role"] in self.slots:
                self.slots[rec["role"]].offer(rec)
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


def next_batch(consumer: Consumer, max_batch: int, max_wait_s: float, idle_s: float = IDLE_POLL_S) -> list[Any]:
    """The next micro-batch: what is already fetched, else block (up to ``idle_s``) for the first record.

    After the first record, wait up to ``max_wait_s`` for more only while the batch is short.
    librdkafka's ``consume(n, timeout)`` waits the whole timeout unless n records come, so a fixed
    timeout would delay every small batch by it. Errors other than end-of-partition are logged.
    """
    msgs = consumer.consume(max_batch, 0)
    if not msgs:
        msgs = consumer.consume(1, idle_s)
        if msgs and max_batch > 1:
            msgs += consumer.consume(max_batch - 1, max_wait_s)
    elif len(msgs) < max_batch and max_wait_s > 0:
        msgs += consumer.consume(max_batch - len(msgs), max_wait_s)
    for m in msgs:
        if m.error() and m.error().code() != KafkaErrorCode._PARTITION_EOF:
            log.warning("consumer error: %s", m.error().str())
    return [m for m in msgs if not m.error()]


def build_scorer(settings: Settings, wsettings: WorkerSettings) -> tuple[Scorer, dict[str, ModelSlot]]:
    loader = lambda rec: load_announced(rec, threads=wsettings.threads or None)  # noqa: E731
    current, gold = ModelSlot("current", loader), ModelSlot("gold", loader)
    return Scorer(current, gold), {"current": current, "gold": gold}


class Worker:
    def __init__(self, settings: Settings, wsettings: WorkerSettings) -> None:
        self.settings, self.wsettings = settings, wsettings
        self.stop = threading.Event()
        self.ready = False
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.scorer, self.slots = build_scorer(settings, wsettings)
        self.watcher = VersionWatcher(settings, self.slots)
        self.counts: Counter[str] = Counter()
        self.transactional_id = f"prefstream-{settings.topic_prefix}{wsettings.group}-{wsettings.worker_id}"

    def _start_models(self) -> None:
        self.watcher.drain()
        self.scorer.swap_if_ready()
        if self.slots["current"].serving is None:
            # Stage 1: before any version exists the untrained default serves, stamped 'bootstrap'.
            self.slots["current"].serving = Loaded(
                bootstrap_model(self.wsettings.bootstrap_max_length, self.wsettings.threads or None), BOOTSTRAP_VERSION)
        self.scorer.export_versions()
        threading.Thread(target=self.watcher.run, name="versions", daemon=True).start()

    def _consumer(self) -> Consumer:
        # The topic prefix isolates deployments sharing a cluster; their groups must be isolated too.
        # A micro-batch on a busy CPU can take longer than the 10 s readers use; a worker that overruns
        # max.poll.interval leaves its group, and on Tansu it was seen never to rejoin (bench, 2 workers).
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.topic_prefix}{self.wsettings.group}",
                                            **{"max.poll.interval.ms": WORKER_MAX_POLL_INTERVAL_MS}))
        consumer.subscribe([self.settings.topic(topics.RAW)])
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
        producer = transactional_producer(self.settings, self.transactional_id)
        consumer = self._consumer()
        shard_thread = self._start_shard_writer()
        sizer = BatchSizer(self.wsettings.max_batch, self.wsettings.batch_target_s)
        self.ready = True
        metrics.READY.set(1)
        log.info("worker %s consuming %s", self.transactional_id, self.settings.topic(topics.RAW))
        try:
            while not self.stop.is_set():
                self.scorer.swap_if_ready()  # between batches only
                producer.poll(0)  # serve the producer's queue (librdkafka's log lines come through it)
                msgs = next_batch(consumer, sizer.limit, self.wsettings.max_wait_ms / 1000)
                if msgs and self._process_batch(pipeline, producer, consumer, msgs, sizer):
                    self._count(msgs)
        finally:
            self.ready = False
            metrics.READY.set(0)
            self.watcher.stop.set()
            consumer.close()  # leave the group now rather than after a session timeout
            if shard_thread is not None:
                shard_thread.join(timeout=30)

    def _process_batch(self, pipeline: Pipeline, producer: Producer, consumer: Consumer, msgs: list[Any],
                       sizer: BatchSizer) -> bool:
        """Process and commit one micro-batch; False when it was rolled back to be done again."""
        try:
            started = time.perf_counter()
            outputs = pipeline.process(msgs)
            sizer.observe(len(msgs), time.perf_counter() - started)
            with metrics.STAGE_SECONDS.labels("commit").time():
                commit_batch(producer, consumer, outputs, msgs)
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                raise BrokerError(f"fatal Kafka error, restart the worker: {err.str()}") from exc
            log.warning("transaction failed (%s); aborting and retrying the batch", err.str())
            if err.txn_requires_abort():
                producer.abort_transaction(TXN_CALL_TIMEOUT_S)
            rewind(consumer)
            time.sleep(RETRY_BACKOFF_S)
            return False
        except (redis.RedisError, OSError) as exc:
            log.warning("batch failed (%s); retrying after %.0f s", exc, RETRY_BACKOFF_S)
            rewind(consumer)
            time.sleep(RETRY_BACKOFF_S)
            return False
        for topic, *_ in outputs:
            metrics.RECORDS_OUT.labels(topic).inc()
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
    worker = Worker(settings, wsettings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop.set())
    server = serve(wsettings.health_host, wsettings.health_port, alive=lambda: not worker.stop.is_set(),
                   ready=lambda: worker.ready) if wsettings.health_port else None
    try:
        worker.run()
    finally:
        if server is not None:
            server.shutdown()
