"""The curation study's docs rows from its result file (the study itself runs in `make bench`)."""

from __future__ import annotations

from bench.curation import PROBES, rows


def _arm(v: float) -> dict:
    return {"mean": dict.fromkeys(PROBES, v), "ci95": {p: [v - 0.01, v + 0.01] for p in PROBES}, "per_seed": []}


def test_one_row_per_data_set_and_length_with_the_paired_gain_and_its_interval():
    gain = {"mean": 0.05, "ci95": [0.02, 0.08], "ceiling_share": 0.5}
    length = {"steps": [84, 40], "pairs": 658, "arms": {"raw": _arm(0.8), "curated": _arm(0.85), "truth": _arm(0.9)},
              "gain": dict.fromkeys(PROBES, gain)}
    result = {"seeds": [0, 1, 2], "datasets": {"generated": {"lengths": {"x1": length, "x3": length | {"steps": [252]}}},
                                               "hh": {"lengths": {"x1": length}}}}
    got = rows(result)
    assert len(got) == 3
    assert got[0].startswith("| curation study, generated, x1 (124 steps, 658 pairs, 3 seeds)")
    assert "gain +0.050 [+0.020, +0.080]" in got[0] and "ceiling share 0.50" in got[0]
    assert "curated 0.850 [0.840, 0.860]" in got[1] and got[2].startswith("| curation study, hh, x1")


def test_a_run_of_one_length_keeps_the_other_lengths_and_data_sets(tmp_path, monkeypatch):
    import json

    import bench.common
    import bench.curation as cur

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(cur, "RESULTS", tmp_path)
    x1 = {"steps": [84], "command": "earlier x1"}
    (tmp_path / "curation.json").write_text(json.dumps({"seeds": [0, 1, 2], "datasets": {
        "generated": {"version": "v", "lengths": {"x1": x1}}, "hh": {"version": "h", "lengths": {"x1": x1}}}}))

    def study(state, lengths, seeds, on_length=None):  # the training itself is tests/test_learning.py's subject
        assert lengths == [3.0]
        out = {"version": "v2", "lengths": {"x3": {"steps": [252]}}}  # another demo run than the kept x1's
        on_length(out)
        return out

    monkeypatch.setattr(cur, "study", study)
    cur.main(["--datasets", "generated", "--state", f"generated={tmp_path}", "--lengths", "3"])
    got = json.loads((tmp_path / "curation.json").read_text())["datasets"]
    assert got["generated"]["lengths"]["x1"]["command"] == "earlier x1"
    assert got["generated"]["lengths"]["x3"]["steps"] == [252] and "--lengths 3" in got["generated"]["lengths"]["x3"]["command"]
    assert got["generated"]["lengths"]["x3"]["version"] == "v2"  # each length names the version it studied
    assert got["hh"]["lengths"] == {"x1": x1}
