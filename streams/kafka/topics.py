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


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    value_schema: str = ""
    doc: str = ""


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(RAW, DEFAULT_PARTITIONS, {"retention.ms": str(WEEK_MS)}, "PreferencePair", "what applications write (JSON or Avro)"),
    TopicSpec(SCORED, DEFAULT_PARTITIONS, {"retention.ms": str(WEEK_MS)}, "ScoredPair", "labels and both RM scores; what downstream reads"),
    TopicSpec(REVIEW, DEFAULT_PARTITIONS, {}, "ReviewTask", "pairs for human review, with similar pairs"),
    TopicSpec(ANNOTATIONS, DEFAULT_PARTITIONS, {}, "Annotation", "one record per annotator verdict"),
    TopicSpec(VERIFIED, DEFAULT_PARTITIONS, {}, "VerifiedPair", "human-verified gold pairs"),
    TopicSpec(CURATED, DEFAULT_PARTITIONS, {}, "CuratedPair", "pairs for training; the shard writer's input"),
    TopicSpec(DLQ, 1, {"retention.ms": str(4 * WEEK_MS)}, "DeadLetter", "bad records with a reason; replayable"),
    # Compacted: the latest record per role is the source of truth for which model serves.
    TopicSpec(MODEL_VERSIONS, 1, {"cleanup.policy": "compact"}, "ModelVersion", "serving model per role"),
)

BY_NAME = {t.name: t for t in TOPICS}


def spec(name: str) -> TopicSpec:
    return BY_NAME[name]
