"""Per-record isolation for stages that work on a whole micro-batch (score, label, embed, verify).

A batch call that raises is split in halves and each half retried, down to single records, so
one poisoned record costs the batch about 2*log2(n) extra calls and only that record is set
aside (for the DLQ); the others keep the results of the calls that succeeded. When every record
of a batch fails on its own the fault is the stage's, not the data's (a broken model, a missing
file): StageFailedError then lets the worker retry the batch instead of dead-lettering the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from confluent_kafka import KafkaException

from streams.exceptions import StageFailedError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors of the infrastructure, not of a record: the batch is retried whole (the worker rewinds).
TRANSIENT: tuple[type[BaseException], ...] = (redis.RedisError, KafkaException, ConnectionError, TimeoutError)
# Errors after which a batch or step is redone from the committed offsets: the infrastructure's, a stage
# failing for every record, and the operating system's.
REDONE: tuple[type[BaseException], ...] = (*TRANSIENT, StageFailedError, OSError)
# A batch this large failing record by record is taken as the stage failing (see the module doc).
# Smaller batches are dead-lettered: with one or two records there is no way to tell, and a worker
# that retried them forever would stall its partitions behind them.
SYSTEMIC_MIN_BATCH = 4




@dataclass
class Failed:
    """The outcome for one record whose own call raised."""

    error: BaseException


def isolate(stage: str, fn: Callable[[list[T]], Sequence[Any]], items: list[T]) -> list[Any]:
    """``fn(items)``'s per-item results, with a ``Failed`` in place of each item that fails on its own."""
    out = _bisect(fn, items)
    if len(items) >= SYSTEMIC_MIN_BATCH and all(isinstance(r, Failed) for r in out):
        first = out[0].error
        raise StageFailedError(f"stage {stage} failed for all {len(items)} records of a batch "
                               f"({type(first).__name__}: {str(first)[:300]}); the batch will be retried") from first
    return out


def _bisect(fn: Callable[[list[T]], Sequence[Any]], items: list[T]) -> list[Any]:
    if not items:
        return []
    try:
        results = list(fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"returned {len(results)} results for {len(items)} records")
        return results
    except TRANSIENT:
        raise
    except Exception as exc:  # any error a record can provoke (RecursionError, MemoryError's kin, bugs)
        if len(items) == 1:
            return [Failed(exc)]
        log.info("batch of %d failed (%s: %s); splitting it", len(items), type(exc).__name__, str(exc)[:200])
    mid = len(items) // 2
    return _bisect(fn, items[:mid]) + _bisect(fn, items[mid:])
