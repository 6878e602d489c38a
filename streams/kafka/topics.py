"""The one table of topics: names, partitions, configs. Provisioning, compose and k8s all read it."""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.settings import Settings

RAW = "prefs.raw"
SCORED = "prefs.scored"
REVIEW = "prefs.review"
ANNOTATIONS = "prefs.annotations"
VERIFIED = "prefs.verified"
CURATED = "prefs.curated"
DLQ = "prefs.dlq"
DEFERRED = "prefs.deferred"
MODEL_VERSIONS = "models.versions"

# Partitions bound how many workers share the load: a worker beyond this count idles. The count is
# the setting PREFSTREAM_PARTITIONS; the table (and the manifests generated from it) use its default.
DEFAULT_PARTITIONS = Settings.model_fields["partitions"].default
WEEK_MS = 7 * 24 * 3600 * 1000
# The largest record any topic takes, and what producers may send (message.max.bytes in
# config.py reads it from here). Set on every topic explicitly: a broker default smaller than the
# producers' limit would refuse a batch's transaction, and the worker would retry it forever.
# Pairs hold at most 4 MiB of text (schemas/pairs.py); outputs add scores and, for review tasks,
# similar pairs that the worker trims to fit.
MAX_MESSAGE_BYTES = 8 << 20
_LIMIT = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    value_schema: str = ""
    doc: str = ""
    scales: bool = False  # its partition count is PREFSTREAM_PARTITIONS (the data topics)

    def partitions_in(self, settings: Settings) -> int:
        return settings.partitions if self.scales else self.partitions


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(RAW, DEFAULT_PARTITIONS, _LIMIT | {"retention.ms": str(WEEK_MS)}, "PreferencePair", "what applications write (JSON or Avro)", scales=True),
    TopicSpec(SCORED, DEFAULT_PARTITIONS, _LIMIT | {"retention.ms": str(WEEK_MS)}, "ScoredPair", "labels and both RM scores; what downstream reads", scales=True),
    TopicSpec(REVIEW, DEFAULT_PARTITIONS, _LIMIT, "ReviewTask", "pairs for human review, with similar pairs", scales=True),
    TopicSpec(ANNOTATIONS, DEFAULT_PARTITIONS, _LIMIT, "Annotation", "one record per annotator verdict", scales=True),
    TopicSpec(VERIFIED, DEFAULT_PARTITIONS, _LIMIT, "VerifiedPair", "human-verified gold pairs", scales=True),
    TopicSpec(CURATED, DEFAULT_PARTITIONS, _LIMIT, "CuratedPair", "pairs for training; the shard writer's input", scales=True),
    # Review candidates beyond the review budget wait here for a newer model (streams/runtime/deferred.py).
    TopicSpec(DEFERRED, DEFAULT_PARTITIONS, _LIMIT | {"retention.ms": str(WEEK_MS)}, "ScoredPair",
              "review candidates beyond the review budget, waiting for a newer model", scales=True),
    TopicSpec(DLQ, 1, _LIMIT | {"retention.ms": str(4 * WEEK_MS)}, "DeadLetter", "bad records with a reason; replayable"),
    # Compacted: the latest record per role is the source of truth for which model serves.
    TopicSpec(MODEL_VERSIONS, 1, _LIMIT | {"cleanup.policy": "compact"}, "ModelVersion", "serving model per role"),
)

BY_NAME = {t.name: t for t in TOPICS}


@dataclass(frozen=True)
class Access:
    """What one component does on the cluster, and so all its Kafka user may do: the topics it reads and
    writes, the consumer groups it commits offsets in and its transactional ids (a name ending in '*' is
    a prefix). Strimzi KafkaUsers with exactly these ACLs are generated from it (streams/deploy.py)."""

    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    groups: tuple[str, ...] = ()
    transactional_ids: tuple[str, ...] = ()


# Readers without a group (assign()ed partitions, nothing committed: the feeder's rebuild, the
# controller's scored window, the workers' model-version watcher) need no group ACL.
ACCESS: dict[str, Access] = {
    # Applications publishing pairs (streams/sdk.py).
    "app": Access(writes=frozenset({RAW})),
    # The pipeline (prefs.raw), its second look (prefs.deferred), the shard writer (prefs.curated), the
    # model-version watcher; one transactional id per worker pod and one for its second look.
    "worker": Access(reads=frozenset({RAW, DEFERRED, CURATED, MODEL_VERSIONS}),
                     writes=frozenset({SCORED, REVIEW, CURATED, DLQ, DEFERRED}),
                     groups=("prefstream-pipeline", "prefstream-pipeline-deferred", "prefstream-shards"),
                     transactional_ids=("prefstream-prefstream-pipeline-*",)),
    # The web app (verdicts), its feeder (prefs.review) and the aggregator (gold, expert tasks, DLQ).
    "review": Access(reads=frozenset({REVIEW, ANNOTATIONS}), writes=frozenset({ANNOTATIONS, REVIEW, VERIFIED, CURATED, DLQ}),
                     groups=("prefstream-aggregator", "prefstream-review-feeder"),
                     transactional_ids=("prefstream-aggregator",)),
    # The drift and rollback windows (prefs.scored); rollbacks are announced.
    "controller": Access(reads=frozenset({SCORED}), writes=frozenset({MODEL_VERSIONS})),
    # A retrain announces the version it published.
    "retrain": Access(writes=frozenset({MODEL_VERSIONS})),
}


def spec(name: str) -> TopicSpec:
    return BY_NAME[name]
