"""`prefstream demo`: the embedded stack moving pairs through Kafka and Redis end to end.

Until the full pipeline lands this is the short smoke run behind `make demo`: start the stack,
publish generated pairs, read them back, dedupe them in Redis, and stop what it started.
"""

from __future__ import annotations

import time
import uuid

import click
import redis
from rich.console import Console

from streams import topics
from streams.embedded.stack import Stack
from streams.exceptions import StreamsError
from streams.sdk import PreferenceProducer, TopicReader
from streams.settings import get_settings

console = Console(stderr=True)

DEMO_PAIRS = 200
DEDUPE_TTL_S = 3600


def _pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 17 + 2, i % 13 + 3
        out.append({"prompt": f"What is {a} * {b}?", "chosen": f"{a} * {b} = {a * b}.",
                    "rejected": f"{a} * {b} = {a * b + 1}.", "source": "demo", "label_source": "tool"})
    return out


@click.command()
@click.option("--pairs", "n", type=int, default=DEMO_PAIRS, show_default=True, help="How many pairs to stream.")
@click.option("--keep/--no-keep", default=False, help="Leave the stack running afterwards.")
def demo(n: int, keep: bool) -> None:
    """Run a short end-to-end demo on the embedded stack.

    Starts the broker and Redis, streams pairs through Kafka, reads them back, dedupes them in
    Redis, then stops what it started."""
    settings = get_settings()
    st = Stack(settings)
    was_running = all(s.pid for s in st.status())
    t0 = time.monotonic()
    st.up()
    console.print(f"stack up in {time.monotonic() - t0:.1f} s at {settings.bootstrap} / {settings.redis_url}")
    try:
        pairs = _pairs(n)
        t0 = time.monotonic()
        with PreferenceProducer(settings) as producer:
            ids = [producer.send(p) for p in pairs]
        console.print(f"produced {len(ids)} pairs to {producer.topic} in {time.monotonic() - t0:.2f} s")
        del producer  # its Kafka client would otherwise outlive the broker and log the shutdown
        r = redis.Redis.from_url(settings.redis_url)
        seen = set()
        # One key per run: Redis keeps its data between runs (AOF), and a rerun must start clean.
        key = f"{settings.topic_prefix}demo:seen:{uuid.uuid4().hex}"
        with TopicReader(settings.topic(topics.RAW), "PreferencePair", settings) as reader:
            for rec in reader.records(idle_timeout=5):
                if rec["pair_id"] in ids and r.sadd(key, rec["pair_id"]):
                    seen.add(rec["pair_id"])
                if len(seen) == len(set(ids)):
                    break
        r.expire(key, DEDUPE_TTL_S)
        missing = len(set(ids) - seen)
        console.print(f"read back {len(seen)} distinct pairs through Kafka, deduplicated in Redis; missing {missing}")
        if missing:
            raise StreamsError(f"{missing} pairs did not come back from {settings.topic(topics.RAW)}")
    finally:
        if not keep and not was_running:
            import gc

            gc.collect()  # close idle Kafka clients first, so they do not log the broker going away
            st.down()
            console.print("stack down")
