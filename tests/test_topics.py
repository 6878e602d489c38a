"""Partition counts: a setting, grown on request, never shrunk."""

from __future__ import annotations

import pytest

from streams.kafka.admin import existing_topics
from streams.kafka.topics import DLQ, RAW, TOPICS
from tests.helpers import json_lines, run_cli, write_jsonl

pytestmark = pytest.mark.integration


def test_topics_create_refuses_to_shrink(settings):
    fewer = settings.model_copy(update={"partitions": 3})
    result = run_cli(["topics", "create"], fewer, check=False)
    assert result.returncode == 1
    assert "cannot remove partitions" in result.stderr and "PREFSTREAM_PARTITIONS to 6" in result.stderr
    assert existing_topics(settings)[settings.topic(RAW)] == 6


def test_new_topics_get_the_partitions_setting(settings):
    wider = settings.model_copy(update={"partitions": 8, "topic_prefix": settings.topic_prefix + "wide."})
    run_cli(["topics", "create"], wider)
    have = existing_topics(wider)
    for spec in TOPICS:
        assert have[wider.topic(spec.name)] == (8 if spec.scales else spec.partitions), spec.name
    assert have[wider.topic(DLQ)] == 1


def test_growing_needs_asking_and_says_when_the_broker_cannot(settings):
    # Adding partitions (CreatePartitions) is Apache Kafka's; the embedded broker refuses it, so here the
    # test checks that it is asked for explicitly and that the refusal says what to do instead.
    more = settings.model_copy(update={"partitions": 8})
    asked = run_cli(["topics", "create"], more, check=False)
    assert asked.returncode == 1 and "--grow" in asked.stderr
    grown = run_cli(["topics", "create", "--grow"], more, check=False)
    if grown.returncode == 0:  # a broker that can add partitions
        assert existing_topics(settings)[settings.topic(RAW)] == 8
    else:
        message = " ".join(grown.stderr.split())  # rich wraps long lines
        assert "Traceback" not in message and "cannot add partitions" in message
        assert "PREFSTREAM_PARTITIONS=8 prefstream topics create" in message and "prefstream consume prefs.raw" in message
        assert existing_topics(settings)[settings.topic(RAW)] == 6


def test_the_migration_the_refusal_names_moves_the_pairs_to_wider_topics(settings, tmp_path):
    # What `topics create --grow` tells a Tansu user to do: new topics under a new prefix, pairs copied.
    pairs = [{"pair_id": f"mig-{i}", "prompt": f"Question {i}?", "chosen": "A good answer.", "rejected": "No."}
             for i in range(5)]
    run_cli(["produce", str(write_jsonl(tmp_path / "pairs.jsonl", pairs))], settings)
    wider = settings.model_copy(update={"partitions": 8, "topic_prefix": settings.topic_prefix + "v2."})
    run_cli(["topics", "create"], wider)
    copied = run_cli(["consume", "prefs.raw", "--timeout", "3"], settings).stdout
    run_cli(["produce", str(write_jsonl(tmp_path / "raw.jsonl", json_lines(copied)))], wider)
    assert existing_topics(wider)[wider.topic(RAW)] == 8
    moved = json_lines(run_cli(["consume", "prefs.raw", "--timeout", "3"], wider).stdout)
    assert sorted(p["pair_id"] for p in moved) == sorted(p["pair_id"] for p in pairs)
    for m, p in zip(sorted(moved, key=lambda r: r["pair_id"]), pairs, strict=True):
        assert m["conversation"][-1]["content"] == p["prompt"] and (m["chosen"], m["rejected"]) == (p["chosen"],
                                                                                                     p["rejected"])
