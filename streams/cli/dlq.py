"""`prefstream dlq list|replay`: the dead-letter queue (prefs.dlq).

Replay is idempotent: each original (topic, key, value, headers) is republished at most once. Before
producing one, replay claims it in Redis (``prefstream:dlq-replayed:<sha256>``, kept as long as the
DLQ keeps records); a claim already there means an earlier replay sent it, and a record that failed
again after a replay comes back to the DLQ as the same original, so replaying twice sends nothing
new. A claim whose record the broker did not acknowledge is given back. ``--force`` sends the
originals again all the same (after fixing a second bug), still once each per run.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import click
import redis

from streams.cli.common import console, to_json
from streams.exceptions import DeliveryError, StackError
from streams.kafka import topics
from streams.kafka.reader import TopicRecord, read_topic
from streams.settings import get_settings

REPLAYED_PREFIX = "prefstream:dlq-replayed:"
# A claim lives as long as the DLQ keeps the dead letter it stands for.
REPLAYED_TTL_S = int(topics.spec(topics.DLQ).config["retention.ms"]) // 1000


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


def original_id(topic: str, dead: dict[str, Any]) -> str:
    """The identity of a dead letter's original as replay would send it to ``topic``."""
    digest = hashlib.sha256()
    parts = [topic.encode(), dead["original_key"], dead["original_value"]]
    for name, value in sorted(dead["original_headers"].items()):
        parts += [name.encode("utf-8", "surrogateescape"), value]
    for part in parts:  # length-prefixed, so no two different originals hash the same stream of bytes
        digest.update(b"-" if part is None else len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def _on_delivery(acked: set[str], ident: str):
    def done(err: Any, _msg: Any) -> None:
        if err is None:
            acked.add(ident)
    return done


def _produce(producer: Any, topic: str, dead: dict[str, Any], on_delivery: Any) -> None:
    for _ in range(2):
        try:
            producer.produce(topic, key=dead["original_key"], value=dead["original_value"],
                             headers=list(dead["original_headers"].items()), on_delivery=on_delivery)
            producer.poll(0)
            return
        except BufferError:  # the local queue is full: let it drain once, then try again
            producer.flush(30)
    raise BufferError("the producer's queue stayed full for 30 s")


@dlq.command("replay")
@click.option("--reason", default=None, help="Only replay dead letters with this reason.")
@click.option("--to", "target", default=None, help="Topic to replay into (default: each record's source topic).")
@click.option("--force", is_flag=True,
              help="Also send originals an earlier replay sent (e.g. after fixing a second bug); once each.")
@click.option("--timeout", type=float, default=3.0, show_default=True)
def dlq_replay(reason: str | None, target: str | None, force: bool, timeout: float) -> None:
    """Re-publish dead letters' original bytes (key, value, headers), e.g. after fixing a bug.

    Each original is sent at most once, however often this runs: an original an earlier replay sent
    (claimed in Redis) is skipped and counted, and so is a second dead letter of the same original
    (a record that failed again after a replay). A dead letter whose original was too large to keep
    whole (original_truncated) is not replayed: its prefix would only fail again. They are counted,
    with their sha256 for finding the original.
    """
    from confluent_kafka import KafkaException, Producer

    from streams.kafka.config import producer_config

    settings = get_settings()
    store = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    claim_prefix = f"{settings.topic_prefix}{REPLAYED_PREFIX}"
    producer = Producer(producer_config(settings))
    acked: set[str] = set()
    sent: list[str] = []
    truncated: list[str] = []
    seen: set[str] = set()
    before = again = 0
    failed: str | None = None
    try:
        for record in _dead_letters(timeout, reason):
            dead = record.value
            if dead.get("original_truncated"):
                truncated.append(f"{dead['source_topic']}[{dead['source_partition']}]@{dead['source_offset']} "
                                 f"sha256 {dead.get('original_sha256')}")
                continue
            topic = target or dead["source_topic"]
            ident = original_id(topic, dead)
            if ident in seen:
                again += 1  # the same original dead-lettered again (after a replay, or a redone batch)
                continue
            seen.add(ident)
            claim = f"dlq offset {record.offset}"
            if not store.set(claim_prefix + ident, claim, nx=not force, ex=REPLAYED_TTL_S):
                before += 1
                continue
            sent.append(ident)
            try:
                _produce(producer, topic, dead, _on_delivery(acked, ident))
            except (KafkaException, BufferError) as exc:
                failed = (f"{dead['source_topic']}[{dead['source_partition']}]@{dead['source_offset']} could not be "
                          f"produced to {topic}: {exc}")
                break
        left = producer.flush(30)
        unsent = [i for i in sent if i not in acked]
        if unsent:
            store.delete(*(claim_prefix + i for i in unsent))  # not written: a later replay may send them
            raise DeliveryError(f"{len(unsent)} of {len(sent)} replayed records were not acknowledged"
                                f"{f' ({left} still queued)' if left else ''}{f'; {failed}' if failed else ''}; "
                                "they stay in the DLQ for the next replay. Is the broker up? (`prefstream stack status`)")
    except redis.RedisError as exc:
        raise StackError(f"Redis at {settings.redis_url} (where replay remembers what it sent) failed: {exc}; "
                         "start it (`prefstream stack up`) or set PREFSTREAM_REDIS_URL") from exc
    console.print(f"replayed {len(sent)} dead letter(s)")
    if before or again:
        console.print(f"skipped {before + again}: {before} sent by an earlier replay (--force sends them again), "
                      f"{again} repeated dead letter(s) of an original met earlier in this run")
    if truncated:
        console.print(f"[yellow]not replayed[/]: {len(truncated)} dead letter(s) kept only a truncated original "
                      f"(republish them from the producer), e.g. {truncated[0]}", highlight=False)


COMMANDS = (dlq,)
