"""A broker that stops answering under a running worker: the worker stays up, says it is not ready
while it cannot make progress, and once the broker answers again every pair it had read is scored,
none twice, and it is ready again.

The broker is frozen (SIGSTOP) and thawed (SIGCONT) rather than restarted: the embedded broker keeps
messages in memory, so a restarted one would be a new, empty cluster. After a freeze longer than the
session timeout the embedded broker was seen not to give the group its partitions back, even to a
new consumer of the same group (docs/design.md, The embedded broker), so this test sends no new
pairs after the thaw.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from streams.embedded.process import free_port
from streams.embedded.stack import Stack
from streams.sdk import PreferenceProducer
from streams.settings import Settings
from tests.helpers import WorkerProcess, wait_for_scored

pytestmark = pytest.mark.integration


def _pairs(tag: str, n: int) -> list[dict]:
    # Long enough that batches take a while to score, so the broker freezes in the middle of one.
    return [{"pair_id": f"{tag}-{i}", "prompt": f"Question {tag} {i}: " + "why? " * 200,
             "chosen": "Because. " * 100, "rejected": "No. " * 100} for i in range(n)]


def _ready(worker: WorkerProcess) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/readyz", timeout=2).status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log(worker: WorkerProcess) -> str:
    return "\n".join(line for line in worker.log.read_text().splitlines() if "Connect to" not in line)[-4000:]


def test_worker_rides_out_a_frozen_broker_and_scores_every_pair_once(tmp_path):
    settings = Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        home=tmp_path / "home", models_dir=tmp_path / "models", shards_dir=tmp_path / "shards")
    stack = Stack(settings)
    stack.up()
    # A stuck batch says "not ready" after 15 s instead of the default 60 s: the freeze is what is tested.
    worker = WorkerProcess(settings, worker_id="outage", extra_env={"PREFSTREAM_WORKER_SHARD_WRITER": "false",
                                                                    "PREFSTREAM_WORKER_STALLED_BATCH_S": "15"})
    broker = stack.broker.pid()
    try:
        worker.start()
        before = _pairs("before", 60)
        with PreferenceProducer(settings) as producer:
            for pair in before:
                producer.send(pair)
        wait_for_scored(settings, {before[0]["pair_id"]}, timeout=120)  # the worker is busy with the rest
        os.kill(broker, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 150
            while _ready(worker) and time.monotonic() < deadline:
                assert worker.proc.poll() is None, "the worker must outlive the broker"
                time.sleep(0.5)
            assert not _ready(worker), "/readyz must say no while the worker cannot make progress:\n" + _log(worker)
            assert worker.proc.poll() is None
        finally:
            os.kill(broker, signal.SIGCONT)
        expected = {p["pair_id"] for p in before}
        try:
            scored = wait_for_scored(settings, expected, timeout=300)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_log(worker)}") from None
        assert worker.proc.poll() is None
        # The worker's outputs are transactional; on the embedded broker a batch aborted and redone may
        # be delivered twice, so "once" is by identity (pair, model version), as every consumer reads it.
        identities = {(r["pair"]["pair_id"], r["model_version"]) for r in scored}
        assert {pid for pid, _ in identities} == expected and len(identities) == len(expected)
        deadline = time.monotonic() + 60
        while not _ready(worker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _ready(worker), "ready again once the broker answers:\n" + _log(worker)
    finally:
        worker.stop()
        stack.down()
