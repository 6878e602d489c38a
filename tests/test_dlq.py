"""Replays and duplicates are exact: `prefstream dlq replay` sends each original at most once, a pair that
failed after ingest is processed when replayed, and a pair_id that comes again with other content is
dead-lettered as duplicate_id_conflict instead of silently dropped."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from streams.kafka import topics
from streams.runtime.processors.ingest import CONFLICT, DEDUPE_PREFIX
from tests.helpers import FakeMessage, FakeScorer, decoded_outputs, fake_pipeline

POISON = "this answer makes the scorer raise"


def _msg(obj: dict, offset: int, topic: str = "prefs.raw") -> FakeMessage:
    return FakeMessage(json.dumps(obj).encode(), key=obj.get("pair_id", "").encode() or None, topic=topic,
                       offset=offset)


def _pair(pid: str, chosen: str = "A kind and useful answer.", **extra) -> dict:
    return {"pair_id": pid, "prompt": f"Question {pid}?", "chosen": chosen, "rejected": "No.", **extra}


def test_an_id_that_comes_again_with_other_content_is_dead_lettered_not_dropped():
    pipeline = fake_pipeline()
    first = decoded_outputs(pipeline.process([_msg(_pair("p1"), 0)]))
    assert [s["pair"]["pair_id"] for s in first["prefs.scored"]] == ["p1"]
    # Another record with the same content (a new created_at is no new content) is a duplicate;
    # one with other text under the same id is a conflict, in the same batch as in a later one.
    again = decoded_outputs(pipeline.process([
        _msg(_pair("p1", created_at=1_700_000_000_000), 1),
        _msg(_pair("p1", chosen="IMPOSTOR: other text under the same id"), 2),
        _msg(_pair("p2"), 3), _msg(_pair("p2", source="elsewhere"), 4)]))
    assert [s["pair"]["pair_id"] for s in again["prefs.scored"]] == ["p2"]
    dead = again["prefs.dlq"]
    assert [(d["reason"], d["source_offset"], d["processor"]) for d in dead] == [(CONFLICT, 2, "ingest"),
                                                                                   (CONFLICT, 4, "ingest")]
    assert "'p1'" in dead[0]["detail"] and "prefs.raw:0:0" in dead[0]["detail"] and "own pair_id" in dead[0]["detail"]
    assert json.loads(dead[0]["original_value"])["chosen"].startswith("IMPOSTOR")


def test_a_pair_dead_lettered_after_ingest_gives_its_id_back():
    pipeline = fake_pipeline(FakeScorer(poison=POISON))
    out = decoded_outputs(pipeline.process([_msg(_pair("bad", chosen=POISON), 0), _msg(_pair("ok"), 1)]))
    assert [(d["reason"], d["processor"]) for d in out["prefs.dlq"]] == [("processing_error", "score")]
    keys = pipeline.redis.data
    assert f"{DEDUPE_PREFIX}ok" in keys and f"{DEDUPE_PREFIX}bad" not in keys
    # Replayed (a new offset) after the scorer is fixed: processed, not dropped as a duplicate of itself.
    pipeline.scorer = FakeScorer()
    replay = decoded_outputs(pipeline.process([_msg(_pair("bad", chosen=POISON), 2), _msg(_pair("ok"), 3)]))
    assert [s["pair"]["pair_id"] for s in replay["prefs.scored"]] == ["bad"]  # "ok" is a true duplicate
    assert "prefs.dlq" not in replay


def test_a_record_that_breaks_the_whole_pipeline_gives_its_id_back_too(monkeypatch):
    pipeline = fake_pipeline()

    def broken(items, outputs):
        raise RuntimeError("a routing bug met by this record")

    monkeypatch.setattr(pipeline, "_route", broken)
    out = decoded_outputs(pipeline.process_each([_msg(_pair("r1"), 0)]))
    assert [(d["reason"], d["processor"]) for d in out["prefs.dlq"]] == [("processing_error", "pipeline")]
    assert f"{DEDUPE_PREFIX}r1" not in pipeline.redis.data


# ---------------------------------------------------------------------------------------------- on the stack
def _consume_new(settings, done: set[tuple[int, int]]) -> list:
    """prefs.raw messages not processed yet (the worker's input, read from the real broker)."""
    from streams.kafka.reader import TopicReader

    with TopicReader(settings.topic(topics.RAW), "PreferencePair", settings) as reader:
        msgs = [m for m in reader.messages(idle_timeout=2) if (m.partition(), m.offset()) not in done]
    done.update((m.partition(), m.offset()) for m in msgs)
    return msgs


def _process(settings, pipeline, done: set[tuple[int, int]]) -> Counter:
    """One pass of the worker's per-batch logic over the new prefs.raw records; outputs go to the real topics."""
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config

    msgs = _consume_new(settings, done)
    outputs = pipeline.process(msgs)
    producer = Producer(producer_config(settings))
    for topic, key, value, headers in outputs:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0
    return Counter(topic.removeprefix(settings.topic_prefix) for topic, *_ in outputs)


@pytest.mark.integration
def test_replaying_twice_sends_each_original_once_and_a_pair_failed_after_ingest_is_processed(settings):
    import redis
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config
    from streams.runtime.pipeline import Pipeline
    from streams.settings import WorkerSettings
    from tests.helpers import FakeEmbedder, read_topic, run_cli

    store = redis.Redis.from_url(settings.redis_url)
    pipeline = Pipeline(settings, WorkerSettings(producer_keys=""), store, FakeScorer(poison=POISON), FakeEmbedder())
    raw = Producer(producer_config(settings))
    records = [_pair("g1"), _pair("g2"), _pair("poisoned", chosen=POISON), {"prompt": "no responses"},
               _pair("g1", chosen="IMPOSTOR under g1's id")]
    for obj in records:
        raw.produce(settings.topic(topics.RAW), key=b"k", value=json.dumps(obj).encode())  # one partition: in order
    raw.produce(settings.topic(topics.RAW), key=b"k", value=b'{"prompt": "broken json", "chosen": ')
    assert raw.flush(30) == 0
    done: set[tuple[int, int]] = set()
    assert _process(settings, pipeline, done)[topics.DLQ] == 4
    dead = read_topic(settings, topics.DLQ, "DeadLetter", idle=2)
    assert Counter(d["reason"] for d in dead) == {"processing_error": 1, "missing_field": 1, "invalid_json": 1,
                                                  CONFLICT: 1}

    # The scorer bug is fixed; replay. Each of the 4 originals goes back to prefs.raw once.
    pipeline.scorer = FakeScorer()
    first = run_cli(["dlq", "replay"], settings)
    assert "replayed 4 dead letter(s)" in first.stderr, first.stderr
    assert _process(settings, pipeline, done)[topics.DLQ] == 3  # the bad JSON and the conflict fail again
    scored = read_topic(settings, topics.SCORED, "ScoredPair", idle=2)
    assert Counter(s["pair"]["pair_id"] for s in scored) == {"g1": 1, "g2": 1, "poisoned": 1}
    assert next(s for s in scored if s["pair"]["pair_id"] == "g1")["pair"]["chosen"] == "A kind and useful answer."

    # Replaying again sends nothing: the 4 were sent, and the 3 new dead letters are their originals failing again.
    second = " ".join(run_cli(["dlq", "replay"], settings).stderr.split())  # rich wraps lines
    assert "replayed 0 dead letter(s)" in second and "skipped 7: 4 sent by an earlier replay" in second, second
    assert "3 repeated dead letter(s)" in second, second
    assert not _consume_new(settings, done)
    raw_values = Counter(m.value() for m in _consume_new(settings, set()))
    assert sorted(raw_values.values()) == [1, 1, 2, 2, 2, 2]  # g1 and g2 once; each dead-lettered original twice
    # --force sends the originals again (once each, though 7 dead letters name them).
    forced = " ".join(run_cli(["dlq", "replay", "--force", "--reason", "invalid_json"], settings).stderr.split())
    assert "replayed 1 dead letter(s)" in forced and "1 repeated" in forced, forced
    assert len(_consume_new(settings, done)) == 1
