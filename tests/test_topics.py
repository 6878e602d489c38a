"""Partition counts: a setting, grown on request, never shrunk."""

from __future__ import annotations

import pytest

from streams.kafka.admin import existing_topics
from streams.kafka.topics import DLQ, RAW, TOPICS
from tests.helpers import run_cli

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
        assert "cannot add partitions" in grown.stderr and "PREFSTREAM_PARTITIONS=N prefstream stack up" in grown.stderr
        assert existing_topics(settings)[settings.topic(RAW)] == 6
