"""The per-batch logic of the worker, free of Kafka plumbing: ingest, score, label, verify and route
a micro-batch, each record isolated so that one bad record goes to the dead-letter queue alone."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from schemas.pairs import prompt_text
from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.transactions import (
    Output,
)
from streams.keys import producer_keys_text
from streams.review import audit, task_ids, tau
from streams.review.task_ids import TaskIds
from streams.review_budget import parse_budget
from streams.runtime import metrics
from streams.runtime.curation import contamination
from streams.runtime.curation.budget import (
    DEFERRED,
    ReviewBudget,
    apply_budget,
    deferred_outputs,
)
from streams.runtime.curation.dedupe import ContentDedupe
from streams.runtime.curation.trust import ProducerKeyring
from streams.runtime.isolation import TRANSIENT, Failed, isolate
from streams.runtime.outputs import (
    PRIORITY_AGE_SCALE,
    Emitter,
    check_score,
    curated_record,
    review_task,
    scored_record,
)
from streams.runtime.processors.embedder import Embedder, EmbedStage
from streams.runtime.processors.ingest import Ingestor
from streams.runtime.processors.labeler import Labeler, LabelStage, LLMLabeler
from streams.runtime.processors.router import Route, RouterPolicy, route, similar_k
from streams.runtime.processors.scorer import Scorer, ScoreStage
from streams.runtime.processors.stage import Item, Stage
from streams.runtime.processors.verifiers import VerifyStage
from streams.runtime.retrieval.index import NeighbourIndex
from streams.runtime.retrieval.store import IndexStore, entry
from streams.settings import Settings, WorkerSettings

log = logging.getLogger(__name__)
# How often the worker reads the controller's tau shifts; a move reaches the routing within this.
TAU_REFRESH_S = 5.0


class Pipeline:
    """The per-batch logic, free of Kafka plumbing (so it can be tested and benchmarked alone).

    Every record is isolated: whatever a stage raises on one record (a validation error, a
    RecursionError in a library, a model that chokes on one input) sends that record to prefs.dlq
    with the stage, the error's type and message and the original bytes, and the rest of the batch
    goes on. Stages that work on the whole batch (score, label, embed, verify) find the record that
    broke them by bisection (isolation.py).
    """

    def __init__(self, settings: Settings, wsettings: WorkerSettings, redis_client: Any, scorer: Scorer,
                 embedder: Embedder | None = None) -> None:
        self.settings, self.wsettings = settings, wsettings
        self.codec = ValueCodec(settings.schema_registry_url)
        self.ingestor = Ingestor(self.codec, redis_client, wsettings.dedupe_ttl_s, key_prefix=settings.topic_prefix,
                                 keyring=ProducerKeyring.parse(producer_keys_text(settings, wsettings)),
                                 content=ContentDedupe(redis_client, wsettings.duplicate_retention_s,
                                                       wsettings.near_duplicate_threshold, settings.topic_prefix))
        # Read before anything slow: a bad file listed stops the worker at start, naming the file.
        self.contamination = contamination.load(wsettings.decontaminate, wsettings.decontaminate_threshold)
        if self.contamination.files:
            log.info("decontamination: %d evaluation prompts from %s", len(self.contamination),
                     ", ".join(f"{stem} ({n})" for stem, n in self.contamination.files.items()))
        self.embedder = embedder or Embedder(threads=wsettings.threads or None, precision=wsettings.embedder_precision)
        labeler = Labeler(self.embedder, redis=redis_client)
        self.labeler: Any = labeler
        if wsettings.llm_url:
            key = wsettings.llm_api_key.get_secret_value() if wsettings.llm_api_key else None
            self.labeler = LLMLabeler(wsettings.llm_url, wsettings.llm_model, labeler, key)
        self.index = NeighbourIndex(self.embedder.dim)
        # The index survives a restart in Redis (and feeds the error-driven expansion, streams/runtime/expansion.py).
        self.store = IndexStore(redis_client, settings.topic_prefix, wsettings.retrieval_persist, self.embedder.dim)
        self._load_index()
        self._scoring = ScoreStage(scorer)
        # The batch stages, in order (processors/stage.py): a new one is a file in processors/ and a line here.
        self.stages: list[Stage] = [self._scoring, LabelStage(self.labeler), EmbedStage(self.embedder), VerifyStage()]
        self.policy = RouterPolicy.from_settings(wsettings)
        self.redis = redis_client
        self.task_ids = TaskIds(redis_client, settings.topic_prefix)
        self.policy_read_at = float("-inf")
        self.out_topics = {name: settings.topic(name) for name in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ,
                                                                      topics.DEFERRED)}
        self.emit = Emitter(self.codec, self.out_topics)
        self.budget = ReviewBudget(parse_budget(wsettings.review_budget))
        self._dead: list[Any] = []  # messages dead-lettered by a stage of the current call
        self._ingested: list[tuple[Any, Any]] = []  # (message, IngestResult) of the last process() call
        self._routed: Counter[str] = Counter()  # route kinds since the last take_routed()

    def _count_route(self, decision: Route) -> None:
        metrics.ROUTES.labels(decision.kind, decision.reason.split(":")[0][:40]).inc()
        if decision.reason.startswith(contamination.REASON_PREFIX):
            metrics.CONTAMINATED.labels(decision.reason.removeprefix(contamination.REASON_PREFIX)[:80]).inc()
        self._routed[decision.kind] += 1

    def take_routed(self) -> Counter[str]:
        """The route kinds decided since the last call: the caller counts them in the history once the batch
        committed (streams/history.py), and drops them when it did not."""
        routed, self._routed = self._routed, Counter()
        return routed

    @property
    def scorer(self) -> Scorer:
        """The serving models (the second look and the expansion score with them too)."""
        return self._scoring.scorer

    @scorer.setter
    def scorer(self, scorer: Scorer) -> None:
        self._scoring.scorer = scorer

    def _fail(self, msg: Any, stage: str, exc: BaseException, outputs: list[Output]) -> None:
        outputs.append(self.emit.fail(msg, stage, exc))
        self._dead.append(msg)

    def _release(self, msgs: list[Any]) -> None:
        """Pairs dead-lettered after ingest give back their dedupe claims: replayed from the DLQ, they are
        processed, not dropped as duplicates of themselves (Redis errors retry the batch)."""
        dead = {id(m) for m in msgs}
        self.ingestor.release([r for m, r in self._ingested if id(m) in dead])

    def _run(self, stage: Stage, items: list[Item], outputs: list[Output]) -> list[Item]:
        """The items ``stage`` handled, each holding its result; the others are dead-lettered."""
        with metrics.STAGE_SECONDS.labels(stage.timer).time():
            results = isolate(stage.name, stage.run, items)
        kept = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, Failed):
                self._fail(item.msg, stage.name, result.error, outputs)
            else:
                stage.keep(item, result)
                kept.append(item)
        return kept

    def process(self, msgs: list[Any]) -> list[Output]:
        outputs: list[Output] = []
        self._dead = []
        with metrics.STAGE_SECONDS.labels("ingest").time():
            results = []
            for m in msgs:
                metrics.RECORDS_IN.labels(m.topic()).inc()
                results.append((m, self.ingestor.decode(m)))  # never raises on a record
            self.ingestor.dedupe(results)  # one Redis call; its errors retry the batch
            self._ingested = results
        items = []
        for m, r in results:
            if r.dead_letter is not None:
                outputs.append(self.emit.dead(m, r.dead_letter))
            elif r.duplicate:
                metrics.DUPLICATES.inc()
            else:
                items.append(Item(m, r.decoded))
        for stage in self.stages:  # a record a stage dead-lettered goes no further
            items = self._run(stage, items, outputs)
        with metrics.STAGE_SECONDS.labels("route").time():
            self._refresh_policy()
            self._route(items, outputs)
        self._release(self._dead)
        return outputs

    def _refresh_policy(self) -> None:
        """Pick up the controller's tau shifts per category (streams/review/tau.py) every TAU_REFRESH_S."""
        self.task_ids.key()  # read once, here where a Redis error retries the batch, before any task is made
        now = time.monotonic()
        if now - self.policy_read_at < TAU_REFRESH_S:
            return
        self.policy_read_at = now
        shifts = tau.read_shifts(self.redis, self.settings.topic_prefix)  # Redis errors retry the batch
        if shifts != dict(self.policy.tau_shift):
            self.policy = replace(self.policy, tau_shift=shifts)
            for category in shifts:
                metrics.TAU.labels(category).set(self.policy.tau_for(category))
            log.info("tau per category: %s", {c: round(self.policy.tau_for(c), 3) for c in sorted(shifts)})

    def process_each(self, msgs: list[Any]) -> list[Output]:
        """``process`` one record at a time: the fallback when ``process`` raised on a batch (a bug, not data)."""
        outputs: list[Output] = []
        self.take_routed()  # the failed batch's routes: its records are routed again below
        for m in msgs:
            try:
                outputs += self.process([m])
            except TRANSIENT:
                raise
            except Exception as exc:  # whatever it is, it is this record's alone now
                self._fail(m, "pipeline", exc, outputs)
                self._release([m])  # the claim its failed process() call may have taken
        return outputs

    def process_deferred(self, msgs: list[Any], pairs: list[dict],
                         reason: Callable[[Item, Route], str]) -> list[Output]:
        """Score deferred pairs (already labelled) again with the serving models and route them by the policy,
        past the review budget and never deferred twice (streams/runtime/deferred.py); a pair still a review
        candidate goes to review with the reason ``reason(item, decision)`` gives."""
        outputs: list[Output] = []
        self._dead = []
        items = [Item(m, pair) for m, pair in zip(msgs, pairs, strict=True)]
        for stage in self.stages:
            if stage.second_look:
                items = self._run(stage, items, outputs)
        now = int(time.time() * 1000)
        with metrics.STAGE_SECONDS.labels("route").time():
            self._refresh_policy()
            for it in items:
                try:
                    decision = self.decide(it)
                    if decision.kind == "review":
                        decision = replace(decision, reason=reason(it, decision))
                    outputs.extend(self._route_one(it, now, decision))
                    if decision.kind == "review":
                        self.budget.spend(1)
                except Exception as exc:  # one record's routing or encoding error is that record's
                    self._fail(it.msg, "route", exc, outputs)
        return outputs

    def _route(self, items: list[Item], outputs: list[Output]) -> None:
        """Route each scored pair and append its output records; then index the batch for retrieval."""
        now = int(time.time() * 1000)
        indexed = []
        # The whole batch is decided first: the review budget keeps the most informative candidates.
        decisions: list[Route | BaseException] = []
        for it in items:
            try:
                decisions.append(self.decide(it))
            except Exception as exc:  # one record's routing error is that record's
                decisions.append(exc)
        decisions = apply_budget(decisions, [it.scored["p"] for it in items], self.budget,
                                 [it.scored["model_version"] for it in items])
        for it, decision in zip(items, decisions, strict=True):
            try:
                if isinstance(decision, BaseException):
                    raise decision
                if decision.kind == DEFERRED:
                    outputs.extend(deferred_outputs(self.emit, it.pair, it.scored, decision))
                    self._count_route(decision)
                else:
                    outputs.extend(self._route_one(it, now, decision))
                if not decision.reason.startswith(contamination.REASON_PREFIX):  # never a neighbour to re-label
                    indexed.append((it, decision))
            except Exception as exc:  # one record's routing or encoding error is that record's
                self._fail(it.msg, "route", exc, outputs)
        if not indexed:
            return
        vectors = np.stack([it.vec for it, _ in indexed])
        try:
            self.index.add(vectors, [(it.pair["pair_id"], prompt_text(it.pair), it.pair["chosen"], it.pair["rejected"],
                                      it.pair["label_source"]) for it, _ in indexed])
            self.store.save(vectors, [entry(it.pair, it.scored, d.kind) for it, d in indexed])
        except TRANSIENT:
            raise  # Redis away: the batch is redone, as for the ingest's dedupe
        except Exception:  # retrieval is context for reviewers: a batch missing from it is not worth a record
            log.exception("could not index a batch of %d pairs for retrieval", len(indexed))

    def _load_index(self) -> None:
        """Fill the index from the store (PREFSTREAM_WORKER_RETRIEVAL_PERSIST), so a restarted worker serves similar
        pairs from its first batch; without Redis it starts empty and fills as it routes."""
        try:
            t0 = time.monotonic()
            if loaded := self.store.load(self.index):
                log.info("retrieval index: %d pairs loaded from Redis in %.1f s", loaded, time.monotonic() - t0)
        except Exception:  # a worker without its old neighbours still routes correctly
            log.exception("could not load the retrieval index from Redis; it starts empty")

    def decide(self, it: Item) -> Route:
        """Where the router sends a scored pair (before the review budget)."""
        check_score(it.scored)
        # An evaluation set's prompt is scored but goes nowhere a training shard is made from.
        if (reason := self.contamination.reason(it.pair)) is not None:
            return Route("dropped", reason)
        return route(it.scored["p"], it.scored["gold_p"], it.verdict, self.policy, it.pair.get("task_category"))

    def _route_one(self, it: Item, now: int, decision: Route) -> list[Output]:
        """The outputs of one pair, all encoded before any is kept, so a failure leaves none half-written."""
        pair, score = it.pair, it.scored
        key = pair["pair_id"].encode()
        scored = self.emit.out(topics.SCORED, "ScoredPair", key, scored_record(pair, score, decision))
        out = [scored]
        if decision.kind == "review":
            neighbours = self.index.search(it.vec, decision.k, exclude=pair["pair_id"])
            task = review_task(pair, score, decision, neighbours, now, len(scored[2]), self.task_ids.of(pair["pair_id"]))
            out.append(self.emit.out(topics.REVIEW, "ReviewTask", key, task))
        elif decision.kind != "dropped":
            out.append(self.emit.out(topics.CURATED, "CuratedPair", key, curated_record(pair, score, decision, now)))
            if decision.kind in audit.KINDS and audit.is_audited(pair["pair_id"], self.wsettings.audit_share):
                out.append(self._audit_task(it, decision, now, len(scored[2])))
        self._count_route(decision)
        return out

    def _audit_task(self, it: Item, decision: Route, now: int, pair_bytes: int) -> Output:
        """A blind review task for a pair curated without a human (streams/review/audit.py)."""
        pair = audit.shown(it.pair, decision.kind, decision.flip)
        neighbours = self.index.search(it.vec, similar_k(it.scored["p"]), exclude=pair["pair_id"])
        # Its id is as opaque as any task's (task_ids.py): an annotator cannot tell it is an audit.
        task = review_task(pair, it.scored, decision, neighbours, now, pair_bytes,
                           self.task_ids.of(pair["pair_id"], task_ids.AUDIT)) | {
            "reason": audit.REASON_PREFIX + decision.kind,
            "priority": audit.PRIORITY + pair["created_at"] / PRIORITY_AGE_SCALE}
        metrics.AUDITS.labels(decision.kind).inc()
        return self.emit.out(topics.REVIEW, "ReviewTask", pair["pair_id"].encode(), task)
