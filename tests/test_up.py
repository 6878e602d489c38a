"""`prefstream up` as a user runs it: its own embedded stack, live status, Ctrl-C, resume."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from streams.embedded.process import free_port
from streams.local.generate import GenerateConfig, generate
from streams.settings import Settings, child_env
from tests.helpers import ROOT, processes_with_env, read_topic, run_cli

pytestmark = pytest.mark.integration


class Up:
    def __init__(self, settings: Settings, review_port: int, log, *args: str) -> None:
        env = child_env(settings) | {"PREFSTREAM_WORKER_SHARD_MAX_AGE_S": "1"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "up", "--plain", "--refresh", "1",
                                      "--review-port", str(review_port), *args], env=env, cwd=ROOT,
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.log.read_text(errors="replace")))
            if found:
                return found[-1]
            assert self.proc.poll() is None, f"up exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(120)


def _produce(settings: Settings, pairs: list[dict]) -> None:
    from streams.sdk import PreferenceProducer

    with PreferenceProducer(settings) as producer:
        for p in pairs:
            producer.send(p)


def _run_once(settings: Settings, log, pairs: list[dict], expect_scored: int, *args: str) -> Up:
    """One `up ARGS` until it has scored ``expect_scored`` pairs, then Ctrl-C."""
    up = Up(settings, free_port(), log, *args)
    try:
        up.wait_for(r"up in \d+ s · review app http://127\.0\.0\.1:\d+")
        up.wait_for(r"status workers=1/1 ")
        _produce(settings, pairs)
        up.wait_for(rf"status workers=1/1 scored={expect_scored} .*routes\[.+\].*serving\[current=bootstrap")
    finally:
        code = up.interrupt()
    assert code == 0, log.read_text()[-3000:]
    return up


def test_up_runs_until_ctrl_c_leaves_nothing_behind_and_resumes(tmp_path):
    home = tmp_path / "home"
    settings = Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        home=home, models_dir=home / "models", shards_dir=home / "shards")
    pairs = list(generate(GenerateConfig(n=20, seed=4, categories=("arithmetic", "capital_cities", "safety"))))

    # 1. `up` starts its own embedded stack, and Ctrl-C stops every process it started, the stack included.
    log = tmp_path / "up1.log"
    _run_once(settings, log, pairs[:5], 5)
    text = log.read_text()
    assert re.search(r"annotator token for this run: \S+", text) and "started the embedded broker" in text
    assert "stopped: " in text and "embedded stack stopped" in text
    assert processes_with_env("PREFSTREAM_HOME", str(home)) == [], "up left processes behind"

    # 2. With a broker that outlives `up`, a second `up` resumes from the committed offsets.
    run_cli(["stack", "up"], settings)
    try:
        log = tmp_path / "up2.log"
        _run_once(settings, log, pairs[5:15], 10)
        assert "using the running broker" in log.read_text()
        left = processes_with_env("PREFSTREAM_HOME", str(home))
        assert left and all("tansu" in c or "redis-server" in c for c in left), left  # only the stack stays
        _run_once(settings, tmp_path / "up3.log", pairs[15:], 5)  # counters restart; only the new pairs are processed
        ids = [r["pair"]["pair_id"] for r in read_topic(settings, "prefs.scored", "ScoredPair")]
        assert sorted(ids) == sorted(p["pair_id"] for p in pairs[5:]), "a pair was lost or processed twice across restarts"
    finally:
        run_cli(["stack", "down"], settings)
    assert processes_with_env("PREFSTREAM_HOME", str(home)) == []
