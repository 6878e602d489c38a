"""Typed views of the records that cross a topic, one TypedDict per Avro schema in ``avsc/``.

The codec decodes to and encodes from plain dicts; these types say which keys such a dict has, so a
function that takes a ScoredPair says so instead of taking ``dict``. A test keeps every TypedDict's
keys equal to its schema's fields.
"""

from __future__ import annotations

from typing import Literal, TypedDict

LabelSource = Literal["human", "llm", "implicit", "tool"]
Role = Literal["current", "gold"]
Strength = Literal["slightly", "clearly", "much"]
# How much better an annotator says the preferred response is, weakest first (an ordinal scale: the
# aggregator takes the median of the majority's, a retrain maps it to a Bradley-Terry margin).
STRENGTHS: tuple[Strength, ...] = ("slightly", "clearly", "much")
# Human verdicts that rank neither response. Their CuratedPairs go to shard splits of these names, kept
# with their verdict but never trained on as a preference (no split a retrain reads).
UNRANKED_SPLITS = ("tie", "both_bad")


class Message(TypedDict):
    role: str
    content: str


class PreferencePair(TypedDict):
    pair_id: str
    conversation: list[Message]
    chosen: str
    rejected: str
    source: str
    label_source: str
    created_at: int  # epoch milliseconds
    metadata: dict[str, str]
    task_category: str | None
    objectivity: str | None
    controversiality: str | None
    expected_attributes: list[str] | None
    annotation_guideline: str | None


class ScoredPair(TypedDict):
    pair: PreferencePair
    reward_chosen: float
    reward_rejected: float
    p: float  # calibrated: sigmoid((reward_chosen - reward_rejected) / temperature)
    temperature: float
    model_version: str
    gold_reward_chosen: float | None
    gold_reward_rejected: float | None
    gold_p: float | None
    gold_temperature: float | None
    gold_model_version: str | None
    route: str | None
    route_reason: str | None
    scored_at: int


class SimilarPair(TypedDict):
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    label_source: str
    similarity: float


class ReviewTask(TypedDict):
    task_id: str
    pair: PreferencePair
    p: float
    margin: float
    model_version: str
    priority: float
    reason: str
    similar: list[SimilarPair]
    expert: bool
    created_at: int


class Annotation(TypedDict):
    annotation_id: str
    task_id: str
    pair_id: str
    annotator: str
    verdict: str
    order: str
    preferred: str
    strength: str | None  # slightly | clearly | much (STRENGTHS)
    rationale: str | None
    expert: bool
    reannotation: bool
    task_category: str | None
    created_at: int


class VerifiedPair(TypedDict):
    pair: PreferencePair
    label: str
    agreement: float
    annotators: list[str]
    decided_by: str
    strength: str | None
    rationale: str | None
    verified_at: int


class CuratedPair(TypedDict):
    pair: PreferencePair
    split: str  # gold | silver | flipped | verified_by_tool | tie | both_bad
    p: float | None
    model_version: str | None
    reason: str
    strength: str | None  # the human majority's (gold)
    curated_at: int


class DeadLetter(TypedDict):
    original_key: bytes | None
    original_value: bytes | None
    original_headers: dict[str, bytes]
    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    processor: str  # the stage that rejected it
    failed_at: int
    error_type: str
    original_size: int | None
    original_sha256: str | None
    original_truncated: bool


class ModelVersion(TypedDict):
    role: str
    version: str
    path: str
    parent: str | None
    manifest_sha256: str
    metrics: dict[str, float]
    action: str
    reason: str
    announced_at: int


BY_SCHEMA: dict[str, type] = {cls.__name__: cls for cls in (
    PreferencePair, ScoredPair, ReviewTask, Annotation, VerifiedPair, CuratedPair, DeadLetter, ModelVersion)}
