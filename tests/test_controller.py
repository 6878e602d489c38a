"""Controller decisions with a fake job runner (the real runners are tested in test_retrain)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import pytest

from streams.runtime.controller import Controller
from streams.runtime.jobs import JobOutcome
from streams.settings import ControllerSettings, Settings
from tests.helpers import toy_pairs, write_shard
from trainers.storage.registry import ModelStore


@dataclass
class FakeHandle:
    name: str
    finished: bool = False
    result: dict | None = None

    def done(self) -> bool:
        return self.finished

    def outcome(self) -> JobOutcome:
        return JobOutcome(self.name, True, self.result)


class FakeRunner:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, dict, list]] = []
        self.handles: list[FakeHandle] = []

    def submit(self, role, labels, extra_args=None):
        self.submitted.append((role, labels, extra_args))
        h = FakeHandle(f"job-{len(self.handles)}")
        self.handles.append(h)
        return h


@pytest.fixture
def ctl(tmp_path):
    settings = Settings(home=tmp_path, models_dir=tmp_path / "models", shards_dir=tmp_path / "shards")
    announced: list[dict] = []
    c = Controller(settings, ControllerSettings(threshold_current=50, threshold_gold=30, window=50, rollback_bound=0.15,
                                                drift_bound=0.2), runner=FakeRunner(), announce=announced.append)
    c.announced = announced
    return c


def decisions(c: Controller) -> list[dict]:
    return [json.loads(line) for line in c.decisions_file.read_text().splitlines()]


def test_threshold_triggers_once_per_role_and_records_why(ctl):
    write_shard(ctl.shards, "silver", toy_pairs(40))
    ctl.step()
    assert ctl.runner.submitted == [] and not ctl.decisions_file.exists()
    write_shard(ctl.shards, "silver", toy_pairs(20, seed=1), first=100)
    ctl.step()
    ctl.step()  # still running: never a second retrain of the same role
    assert [s[0] for s in ctl.runner.submitted] == ["current"]
    assert ctl.runner.submitted[0][1]["prefstream.io/data-pairs"] == "60"
    h = ctl.runner.handles[0]
    h.finished, h.result = True, {"decision": "gate_failed", "reason": "holdout accuracy fell"}
    ctl.step()
    assert [(d["decision"], d["role"]) for d in decisions(ctl)] == [("triggered", "current"), ("gate_failed", "current")]
    assert decisions(ctl)[0]["reason"].startswith("threshold: 60 new pairs")
    ctl.step()
    assert len(ctl.runner.submitted) == 1, "the same pairs must not trigger again"
    assert json.loads(ctl.state_file.read_text())["trained_total"]["current"] == 60


def test_gold_counts_only_gold_pairs(ctl):
    write_shard(ctl.shards, "silver", toy_pairs(45))
    write_shard(ctl.shards, "gold", toy_pairs(30, seed=3))
    ctl.step()
    assert sorted(s[0] for s in ctl.runner.submitted) == ["current", "gold"]


def _model(tmp_path):
    from trainers.scoring.model import RewardModel

    return RewardModel.default(max_length=32).save(tmp_path / "src")


_PAIR_IDS = itertools.count()


def _feed(ctl, version, n, disagree_share, mispredict_share=0.0):
    for i in range(n):
        p = 0.3 if i < n * mispredict_share else 0.8
        gold_p = (1 - p) if i < n * disagree_share else p
        # A new pair each time: the monitor counts each (pair_id, model_version) once.
        ctl.monitor.observe({"pair": {"pair_id": f"p{next(_PAIR_IDS)}"}, "model_version": version, "p": p, "gold_p": gold_p})


def test_a_second_copy_of_a_scored_pair_is_not_counted_again(ctl):
    rec = {"pair": {"pair_id": "p-dup"}, "model_version": "v1", "p": 0.3, "gold_p": 0.8}
    for _ in range(3):  # e.g. an aborted transaction's copy and the redone one, both delivered
        ctl.monitor.observe(dict(rec))
    ctl.monitor.observe(rec | {"model_version": "v2"})  # another version's score of the pair counts for v2
    st = ctl.monitor.stats
    assert (len(st["v1"].mispredicted), len(st["v1"].disagree), len(st["v2"].mispredicted)) == (1, 1, 1)
    assert ctl.monitor.duplicates == 2


def test_live_rollback_when_the_new_version_disagrees_with_gold(ctl, tmp_path):
    store = ModelStore(ctl.settings.models_dir)
    v1 = store.publish(_model(tmp_path), "current").version
    v2 = store.publish(_model(tmp_path), "current", parent=v1).version
    _feed(ctl, v1, 60, 0.1)
    _feed(ctl, v2, 30, 0.6)
    ctl.check_rollback()
    assert store.serving("current") == v2, "too few records of the new version to judge"
    _feed(ctl, v2, 30, 0.6)
    ctl.check_rollback()
    assert store.serving("current") == v1
    assert ctl.announced[-1]["action"] == "rollback" and ctl.announced[-1]["version"] == v1
    d = decisions(ctl)[-1]
    assert d["decision"] == "rolled_back" and d["version"] == v2 and "disagrees with the gold model" in d["reason"]


def test_no_rollback_when_the_new_version_is_as_good(ctl, tmp_path):
    store = ModelStore(ctl.settings.models_dir)
    v1 = store.publish(_model(tmp_path), "current").version
    v2 = store.publish(_model(tmp_path), "current", parent=v1).version
    _feed(ctl, v1, 60, 0.2)
    _feed(ctl, v2, 60, 0.25)
    ctl.check_rollback()
    assert store.serving("current") == v2


def test_drift_triggers_a_current_retrain(ctl):
    write_shard(ctl.shards, "silver", toy_pairs(5))
    _feed(ctl, "bootstrap", 50, 0.0, mispredict_share=0.1)
    _feed(ctl, "bootstrap", 50, 0.0, mispredict_share=0.6)
    ctl.step()
    assert [s[0] for s in ctl.runner.submitted] == ["current"]
    assert decisions(ctl)[0]["reason"].startswith("drift: misprediction rate 0.600")
