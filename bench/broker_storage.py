"""The embedded broker's two storage engines side by side: memory and the durable object store.

`python -m bench.broker_storage` starts a private in-memory stack and a private durable one (Tansu
on SeaweedFS) in turn, produces the same records to each from one confluent-kafka producer, and
times single flushed messages. Writes bench/results/broker_storage.json; docs/design.md quotes it.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic

from bench.common import write_result
from streams.embedded.objectstore import ObjectStorePorts
from streams.embedded.process import free_port, port_is_free
from streams.embedded.stack import Stack
from streams.kafka.admin import admin
from streams.kafka.config import producer_config
from streams.settings import Settings

RECORDS = 20_000
RECORD_BYTES = 200
FLUSHES = 20
TOPIC = "bench.storage"


def _object_store_port() -> int:
    while True:
        port = random.randint(20000, 55000)
        if all(port_is_free("127.0.0.1", p) for p in ObjectStorePorts.from_s3_port(port).all().values()):
            return port


def _measure(home: Path, durable: bool) -> dict[str, Any]:
    settings = Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        home=home, durable=durable, object_store_port=_object_store_port())
    stack = Stack(settings)
    t0 = time.monotonic()
    stack.up()
    started_s = time.monotonic() - t0
    try:
        client = admin(settings)
        client.create_topics([NewTopic(TOPIC, 1, 1)])[TOPIC].result(30)
        producer, value = Producer(producer_config(settings)), b"x" * RECORD_BYTES
        t0 = time.monotonic()
        for _ in range(RECORDS):
            while True:
                try:
                    producer.produce(TOPIC, value)
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    producer.poll(0.01)
        assert producer.flush(120) == 0, "records were not acknowledged"
        rate = RECORDS / (time.monotonic() - t0)
        flushes = []
        for _ in range(FLUSHES):
            t0 = time.monotonic()
            producer.produce(TOPIC, value)
            producer.flush(10)
            flushes.append(time.monotonic() - t0)
        return {"msgs_per_s": round(rate), "flush_ms_median": round(statistics.median(flushes) * 1000, 2),
                "stack_up_s": round(started_s, 1)}
    finally:
        stack.down()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        memory = _measure(Path(tmp) / "memory", durable=False)
        durable = _measure(Path(tmp) / "durable", durable=True)
    result = {"records": RECORDS, "record_bytes": RECORD_BYTES, "memory": memory, "durable": durable,
              "durable_vs_memory_rate": round(durable["msgs_per_s"] / memory["msgs_per_s"], 2)}
    path = write_result("broker_storage", result, "python -m bench.broker_storage")
    print(f"memory {memory}\ndurable {durable}\nrate ratio {result['durable_vs_memory_rate']} -> {path}")


if __name__ == "__main__":
    main()
