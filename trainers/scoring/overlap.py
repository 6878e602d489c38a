"""Scoring with the host and the device busy at once.

A plain scoring loop leaves the GPU idle while the host tokenises, pads and copies the next batch
(a small model in bf16 then scores no faster than in fp32: the device waits on the host). Here a
CPU thread tokenises the inputs chunk by chunk, cuts each chunk into length-sorted batches within
the model's token budget, and pads each batch into page-locked tensors; the calling thread copies
each batch to the device with ``non_blocking=True`` and queues its forward pass without waiting for
the result. The only wait is one copy of all rewards back at the end.

Chunks start small, so the device starts after a few sequences are tokenised, and double in size
up to ``MAX_CHUNK``, so later chunks sort enough sequences together to pad little. Scores do not
depend on the grouping: a decoder reads its reward at the last token that is not padding
(tests/test_gpu_path.py checks it against one-at-a-time scoring).

On the CPU the same code runs without page-locking (it is tested there); the CPU default stays the
sequential loop, whose call-cost batching was measured to be faster on two cores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trainers.scoring.model import RewardModel

FIRST_CHUNK = 64
MAX_CHUNK = 1024
# Padded batches waiting for the device: one being copied while the next is prepared; more would
# only hold page-locked memory.
QUEUE_DEPTH = 2
_PUT_WAIT_S = 0.1  # how often a blocked producer checks whether the consumer gave up


def chunk_bounds(n: int, first: int = FIRST_CHUNK, largest: int = MAX_CHUNK) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive chunks covering ``n`` inputs: ``first``, then doubling up to ``largest``."""
    start, size = 0, first
    while start < n:
        yield start, min(n, start + size)
        start, size = start + size, min(largest, size * 2)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def score_overlapped(rm: RewardModel, conversations: Sequence[Sequence[dict]], responses: Sequence[str]) -> np.ndarray:
    """Rewards of (conversation, response) in input order, host work overlapped with the device's."""
    backend = rm.backend
    ready: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=_PUT_WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def prepare() -> None:
        try:
            for start, end in chunk_bounds(len(responses), FIRST_CHUNK, MAX_CHUNK):
                encoded = rm.formatter.encode(conversations[start:end], responses[start:end])
                for batch in rm.batches([len(e["input_ids"]) for e in encoded]):
                    host = backend.host(rm.formatter.pad([encoded[i] for i in batch]))
                    if not put((np.asarray(batch, dtype=np.int64) + start, host)):
                        return
            put(_DONE)
        except BaseException as exc:  # handed to the calling thread, which raises it
            put(_Failed(exc))

    thread = threading.Thread(target=prepare, name="score-host", daemon=True)
    thread.start()
    order: list[np.ndarray] = []
    launched: list[Any] = []
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            indices, host = item
            launched.append(backend.launch(host))
            order.append(indices)
        rewards = backend.collect(launched)
    finally:
        stop.set()
        thread.join()
    out = np.zeros(len(responses), dtype=np.float32)
    if order:
        out[np.concatenate(order)] = rewards
    return out
