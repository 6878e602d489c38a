"""The demo's plan (phases sized from Stage 1's speed) and its exit code: fewer retrains than planned
is a warning, only misbehaviour fails the run."""

from __future__ import annotations

import pytest

from streams.local import demo
from streams.local.demo import MIN_RETRAIN_WAIT_S, DemoConfig, plan_phases


def test_a_fast_machine_gets_every_retrain_asked_for():
    plan = plan_phases(DemoConfig(retrains=2), 1920, stage1_s=19.0, seconds_left=870)
    assert (plan.retrains, plan.phase_size, plan.threshold) == (2, 640, 160)
    assert plan.note == "" and plan.retrain_wait_s >= MIN_RETRAIN_WAIT_S
    # Sized to the data: the second retrain is full, over both earlier phases' curated pairs, for two epochs.
    steps = demo.retrain_steps(DemoConfig(retrains=2), 640, 2)
    assert steps == int(2.0 * 2 * 640 * demo.CURATED_SHARE / demo.RETRAIN_BATCH) + 1
    assert plan.retrain_estimate_s == pytest.approx(19.0 * demo.RETRAIN_PER_SEED_STEP * steps / 15, abs=0.1)


def test_a_slow_machine_plans_fewer_retrains_and_says_so():
    fast = plan_phases(DemoConfig(retrains=2), 1920, stage1_s=19.0, seconds_left=870)
    slow = plan_phases(DemoConfig(retrains=2), 1920, stage1_s=150.0, seconds_left=700)
    assert slow.retrains == 1 and slow.phase_size == 960
    assert "2 asked for; 1 fit" in slow.note and "1 retrain(s), 2 phases of 960 pairs" in slow.describe(10)
    assert slow.retrain_estimate_s > fast.retrain_estimate_s and slow.retrain_wait_s > fast.retrain_wait_s
    # Never fewer than one: a demo without a retrain would show nothing of the loop.
    assert plan_phases(DemoConfig(retrains=2), 1920, stage1_s=1000.0, seconds_left=100).retrains == 1


@pytest.mark.parametrize("failures, warnings, code", [([], ["only 1 of 2 planned retrains"], None),
                                                      (["worker-0 exited 1"], [], 1)])
def test_only_misbehaviour_makes_the_demo_exit_non_zero(monkeypatch, capsys, failures, warnings, code):
    monkeypatch.setattr(demo, "run_demo", lambda cfg, settings: {"failures": failures, "warnings": warnings})
    monkeypatch.setattr("streams.local.report_files.summary", lambda report: "demo summary")
    if code is None:
        demo.demo_main(DemoConfig())
    else:
        with pytest.raises(SystemExit) as exc:
            demo.demo_main(DemoConfig())
        assert exc.value.code == code


def test_the_hh_stream_plants_noise_in_hh_pairs_and_keeps_seed_holdout_and_probe_apart(tmp_path):
    from tests.helpers import require_hh_rlhf

    require_hh_rlhf()
    cfg = DemoConfig(stream="hh", pairs=400, seed_pairs=60, holdout_pairs=80)
    data = demo.build_data(cfg, tmp_path)
    assert {k: len(v) for k, v in data.items()} == {"stream": 400, "seed": 60, "holdout": 80, "probe": 150,
                                                   "regression": 60}
    ids = {k: {p["pair_id"] for p in v} for k, v in data.items() if k != "regression"}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values())), "the sets share pairs"
    stream = data["stream"]
    assert all(p["metadata"]["gen_category"] == "hh_rlhf" for p in stream)
    assert 0.1 < sum(p["metadata"]["flipped"] == "true" for p in stream) / len(stream) < 0.35
    assert all(p["metadata"]["flipped"] == "false" for p in data["seed"] + data["holdout"])
    assert any(p["metadata"]["style_trap"] == "true" for p in data["holdout"])
    for name in ("stream", "seed", "holdout", "probe", "regression"):
        assert (tmp_path / f"{name}.jsonl").read_text().count("\n") == len(data[name])
