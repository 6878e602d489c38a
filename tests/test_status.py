"""`prefstream up`'s status snapshot: rates, retrain state, and both renderings."""

from __future__ import annotations

import json
from collections import Counter

from rich.console import Console

from streams.local.status import (
    ChangePrinter,
    Snapshot,
    controller_decisions,
    one_line,
    rates,
    render,
    retrain_state,
)
from streams.review import audit
from streams.settings import Settings


def _snap(t: float, scored: int, raw: int) -> Snapshot:
    return Snapshot(time=t, workers=2, workers_up=2, records_in=Counter({"prefs.raw": raw}),
                    records_out=Counter({"prefs.scored": scored}), routes=Counter({"review": 3, "silver": scored - 3}),
                    scored=scored, mispredicted=3, serving={"current": "current-v2", "gold": "gold-v1"},
                    models={"current": {"version": "current-v2", "holdout_accuracy": 0.8125}},
                    retrains={"current": "running since 12:00:00 (threshold)"},
                    review={"pending": 4, "expert": 1, "verdicts": 17}, alpha=0.71, review_url="http://127.0.0.1:8080",
                    audits=audit.summary({("math", "silver"): audit.AuditCount(right=9, wrong=1, split=2),
                                          ("math", "flipped"): audit.AuditCount(right=4)}))


def test_rates_are_per_second_between_snapshots():
    r = rates(_snap(12.0, 30, 40), _snap(10.0, 10, 20))
    assert r == {"prefs.raw": 10.0, "prefs.scored": 10.0}
    assert rates(_snap(12.0, 30, 40), None) == {}


def test_retrain_state_follows_the_decision_log(tmp_path):
    settings = Settings(home=tmp_path)
    log = settings.controller_decisions_file
    assert controller_decisions(settings) == [] and retrain_state([]) == {}
    entries = [{"time": 0, "role": "current", "decision": "triggered", "reason": "threshold: 500 new"},
               {"time": 0, "role": "gold", "decision": "triggered", "reason": "drift: up"},
               {"time": 0, "role": "gold", "decision": "published", "reason": "ok", "version": "gold-v2"}]
    log.parent.mkdir(parents=True)
    # The last line is torn, as a controller killed while appending leaves it.
    log.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"time": 0, "role": "gold", "decis')
    assert controller_decisions(settings) == entries
    state = retrain_state(controller_decisions(settings))
    assert state["current"].startswith("running since") and "(threshold)" in state["current"]
    assert state["gold"].startswith("published gold-v2 at ")


def test_live_view_and_plain_line_show_the_same_facts():
    now, before = _snap(12.0, 30, 40), _snap(10.0, 10, 20)
    console = Console(record=True, width=200)
    console.print(render(now, before))
    text = console.export_text()
    for fact in ("workers 2/2 up", "scored 30", "review queue 4 (+1 expert)", "alpha 0.71", "current-v2", "0.812",
                 "running since 12:00:00", "http://127.0.0.1:8080", "prefs.raw", "10.0",
                 "audited precision: silver 0.900 of 10 · flipped 1.000 of 4"):
        assert fact in text, fact
    line = one_line(now, before)
    assert "scored=30" in line and "raw_per_s=10.0" in line and "serving[current=current-v2,gold=gold-v1]" in line
    assert "audits[silver 0.900 of 10 · flipped 1.000 of 4]" in line


def test_plain_mode_prints_when_the_state_changes_or_a_quiet_minute_passed():
    printer = ChangePrinter(every_s=60)
    first = Snapshot(time=0.0, workers=1, workers_up=1, scored=10, records_in=Counter({"prefs.raw": 10}))
    assert printer.line(first, None) is not None  # the first status is always printed
    # Records flowed (a rate) but nothing else changed: no line; the scored count moved: a line.
    same = Snapshot(time=1.0, workers=1, workers_up=1, scored=10, records_in=Counter({"prefs.raw": 20}))
    assert printer.line(same, first) is None
    moved = Snapshot(time=2.0, workers=1, workers_up=1, scored=11, records_in=Counter({"prefs.raw": 21}))
    assert printer.line(moved, same) is not None
    quiet = Snapshot(time=30.0, workers=1, workers_up=1, scored=11)
    assert printer.line(quiet, moved) is None
    later = Snapshot(time=62.5, workers=1, workers_up=1, scored=11)
    assert printer.line(later, quiet) == one_line(later, quiet)  # a minute with no change: one line anyway
    down = Snapshot(time=63.0, workers=1, workers_up=0, scored=11)
    assert "workers=0/1" in printer.line(down, later)
