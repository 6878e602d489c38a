"""The one table of topics: names, partitions, configs. Provisioning, compose and k8s all read it."""

from __future__ import annotations

from dataclasses import dataclass, field

RAW = "prefs.raw"
SCORED = "prefs.scored"
REVIEW = "prefs.review"
ANNOTATIONS = "prefs.annotations"
VERIFIED = "prefs.verified"
CURATED = "prefs.curated"
DLQ = "prefs.dlq"
MODEL_VERSIONS = "models.versions"

# Partitions bound how many workers share the load: a worker beyond this count idles.
DEFAULT_PARTITIONS = 6
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


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(RAW, DEFAULT_PARTITIONS, _LIMIT | {"retention.ms": str(WEEK_MS)}, "PreferencePair", "what applications write (JSON or Avro)"),
    TopicSpec(SCORED, DEFAULT_PARTITIONS, _LIMIT | {"retention.ms": str(WEEK_MS)}, "ScoredPair", "labels and both RM scores; what downstream reads"),
    TopicSpec(REVIEW, DEFAULT_PARTITIONS, _LIMIT, "ReviewTask", "pairs for human review, with similar pairs"),
    TopicSpec(ANNOTATIONS, DEFAULT_PARTITIONS, _LIMIT, "Annotation", "one record per annotator verdict"),
    TopicSpec(VERIFIED, DEFAULT_PARTITIONS, _LIMIT, "VerifiedPair", "human-verified gold pairs"),
    TopicSpec(CURATED, DEFAULT_PARTITIONS, _LIMIT, "CuratedPair", "pairs for training; the shard writer's input"),
    TopicSpec(DLQ, 1, _LIMIT | {"retention.ms": str(4 * WEEK_MS)}, "DeadLetter", "bad records with a reason; replayable"),
    # Compacted: the latest record per role is the source of truth for which model serves.
    TopicSpec(MODEL_VERSIONS, 1, _LIMIT | {"cleanup.policy": "compact"}, "ModelVersion", "serving model per role"),
)

BY_NAME = {t.name: t for t in TOPICS}


def spec(name: str) -> TopicSpec:
    return BY_NAME[name]
