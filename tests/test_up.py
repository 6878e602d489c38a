"""`prefstream up` as a user runs it: its own embedded stack, live status, Ctrl-C, resume."""

from __future__ import annotations

import re

import pytest

from streams.embedded.process import free_port
from streams.local.generate import GenerateConfig, generate
from streams.settings import Settings
from tests.helpers import distinct_pairs, processes_with_env, read_topic, run_cli, run_up_once

pytestmark = pytest.mark.integration


def test_up_runs_until_ctrl_c_leaves_nothing_behind_and_resumes(tmp_path):
    home = tmp_path / "home"
    settings = Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        home=home, models_dir=home / "models", shards_dir=home / "shards")
    pairs = distinct_pairs(generate(GenerateConfig(n=40, seed=4, categories=("arithmetic", "capital_cities", "safety"))), 20)

    # 1. `up` starts its own embedded stack, and Ctrl-C stops every process it started, the stack included.
    log = tmp_path / "up1.log"
    run_up_once(settings, log, pairs[:5], 5)
    text = log.read_text()
    assert re.search(r"annotator token for this run: \S+", text) and "started the embedded broker" in text
    assert "stopped: " in text and "embedded stack stopped" in text
    assert processes_with_env("PREFSTREAM_HOME", str(home)) == [], "up left processes behind"

    # 2. With a broker that outlives `up`, a second `up` resumes from the committed offsets.
    run_cli(["stack", "up"], settings)
    try:
        log = tmp_path / "up2.log"
        run_up_once(settings, log, pairs[5:15], 10)
        assert "using the running broker" in log.read_text()
        left = processes_with_env("PREFSTREAM_HOME", str(home))
        assert left and all("tansu" in c or "redis-server" in c for c in left), left  # only the stack stays
        run_up_once(settings, tmp_path / "up3.log", pairs[15:], 5)  # counters restart; only the new pairs are processed
        ids = [r["pair"]["pair_id"] for r in read_topic(settings, "prefs.scored", "ScoredPair")]
        assert sorted(ids) == sorted(p["pair_id"] for p in pairs[5:]), "a pair was lost or processed twice across restarts"
    finally:
        run_cli(["stack", "down"], settings)
    assert processes_with_env("PREFSTREAM_HOME", str(home)) == []
