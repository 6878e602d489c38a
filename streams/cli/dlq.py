"""`prefstream dlq list|replay`: the dead-letter queue (prefs.dlq)."""

from __future__ import annotations

from collections import Counter

import click

from streams.cli.common import console, to_json
from streams.exceptions import DeliveryError
from streams.kafka import topics
from streams.kafka.reader import TopicRecord, read_topic
from streams.settings import get_settings


@click.group("dlq")
def dlq() -> None:
    """Inspect and replay the dead-letter queue (prefs.dlq)."""


def _dead_letters(timeout: float, reason: str | None) -> list[TopicRecord]:
    records = read_topic(get_settings(), topics.DLQ, "DeadLetter", idle_timeout=timeout)
    return [r for r in records if reason is None or r.value["reason"] == reason]


@dlq.command("list")
@click.option("--reason", default=None, help="Only dead letters with this reason (e.g. invalid_json).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines; the original key, value and headers are base64 strings.")
@click.option("--timeout", type=float, default=3.0, show_default=True)
def dlq_list(reason: str | None, as_json: bool, timeout: float) -> None:
    """List dead letters with their reason and source; ends with a count per reason."""
    counts: Counter[str] = Counter()
    for record in _dead_letters(timeout, reason):
        dead = record.value
        counts[dead["reason"]] += 1
        if as_json:
            click.echo(to_json(dead | {"dlq_offset": record.offset}))
        else:
            click.echo(f"{record.offset:>8} {dead['reason']:<20} {dead['source_topic']}[{dead['source_partition']}]@"
                       f"{dead['source_offset']}: {dead['detail'][:100]}")
    for r, n in counts.most_common():
        console.print(f"{r}: {n}")


@dlq.command("replay")
@click.option("--reason", default=None, help="Only replay dead letters with this reason.")
@click.option("--to", "target", default=None, help="Topic to replay into (default: each record's source topic).")
@click.option("--timeout", type=float, default=3.0, show_default=True)
def dlq_replay(reason: str | None, target: str | None, timeout: float) -> None:
    """Re-publish dead letters' original bytes (key, value, headers), e.g. after fixing a bug.

    A dead letter whose original was too large to keep whole (original_truncated) is not replayed:
    its prefix would only fail again. They are counted, with their sha256 for finding the original.
    """
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config

    producer = Producer(producer_config(get_settings()))
    n = 0
    truncated: list[str] = []
    for record in _dead_letters(timeout, reason):
        dead = record.value
        if dead.get("original_truncated"):
            truncated.append(f"{dead['source_topic']}[{dead['source_partition']}]@{dead['source_offset']} "
                             f"sha256 {dead.get('original_sha256')}")
            continue
        producer.produce(target or dead["source_topic"], key=dead["original_key"], value=dead["original_value"],
                         headers=list(dead["original_headers"].items()))
        n += 1
    left = producer.flush(30)
    if left:
        raise DeliveryError(f"{left} replayed records were not acknowledged; is the broker up? (`prefstream stack status`)")
    console.print(f"replayed {n} dead letter(s)")
    if truncated:
        console.print(f"[yellow]not replayed[/]: {len(truncated)} dead letter(s) kept only a truncated original "
                      f"(republish them from the producer), e.g. {truncated[0]}", highlight=False)


COMMANDS = (dlq,)
