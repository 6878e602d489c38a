"""The worker's readiness when its main loop stops turning between batches (no batch in progress)."""

from __future__ import annotations

import time

from streams.runtime.worker import Worker
from streams.settings import WorkerSettings


def _worker(stalled_s: float) -> Worker:
    w = Worker.__new__(Worker)  # the readiness logic alone: no broker, models or Redis
    w.wsettings = WorkerSettings(stalled_batch_s=stalled_s)
    w.started, w.failed_batches, w.batch_since, w.broker_away_since = True, 0, None, None
    w._turn("the error-driven expansion")
    return w


def test_a_main_loop_stuck_between_batches_turns_not_ready_and_dumps_the_stacks_once(capfd):
    w = _worker(stalled_s=5)
    assert w.is_ready()
    w.loop_at = time.monotonic() - 6  # the loop last turned 6 s ago, in the expansion
    assert not w.is_ready() and not w.is_ready()
    err = capfd.readouterr().err
    assert "Current thread 0x" in err and "streams/runtime/worker.py" in err  # where the loop stands
    assert "in the error-driven expansion for more than 5 s" in w._not_ready_reason()
    assert w.is_ready() is False and capfd.readouterr().err == "", "the stacks are dumped once per stall"
    w._turn("polling prefs.raw")  # it turned again: ready, and a later stall dumps again
    assert w.is_ready()
