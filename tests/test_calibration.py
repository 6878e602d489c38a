"""Temperature scaling and calibration error (trainers/evaluation/calibration.py): the math, on synthetic margins."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainers.evaluation.calibration import (
    T_MAX,
    T_MIN,
    calibrate,
    calibrated_p,
    expected_calibration_error,
    fit_temperature,
    reliability,
    temperature_of,
    version_temperature,
)
from trainers.exceptions import CalibrationError


def synthetic(t_true: float, n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Margins whose labels are drawn as Bernoulli(sigmoid(margin / t_true)): t_true is the right temperature."""
    rng = np.random.default_rng(seed)
    margins = rng.normal(0.0, 3.0, n)
    return margins, (rng.random(n) < calibrated_p(margins, t_true)).astype(int)


@pytest.mark.parametrize("t_true", [0.4, 2.5])
def test_calibration_recovers_a_known_temperature_on_synthetic_margins(t_true):
    margins, labels = synthetic(t_true)
    assert fit_temperature(margins, labels) == pytest.approx(t_true, rel=0.05)


def test_gold_oriented_pairs_fit_the_same_temperature_as_labelled_ones():
    # A holdout comes oriented by its gold label (all label 1): the same pairs, flipped where the label was 0.
    margins, labels = synthetic(1.7, n=5000, seed=3)
    oriented = np.where(labels == 1, margins, -margins)
    assert fit_temperature(oriented) == pytest.approx(fit_temperature(margins, labels), rel=1e-6)


def test_ece_falls_after_calibration_on_miscalibrated_data():
    # Margins too small for their accuracy (T = 0.3): sigmoid(margin) is underconfident.
    margins, labels = synthetic(0.3, n=5000, seed=1)
    cal = calibrate(margins, labels)
    assert cal.note == "" and cal.temperature == pytest.approx(0.3, rel=0.1)
    assert cal.ece_raw > 0.1 and cal.ece < cal.ece_raw / 4
    assert cal.ece == pytest.approx(expected_calibration_error(calibrated_p(margins, cal.temperature), labels))


def test_reliability_bins_hold_mean_confidence_accuracy_and_count():
    p = np.array([0.55, 0.45, 0.95, 0.05, 1.0, 0.5])
    labels = np.array([1, 1, 1, 0, 1, 1])
    bins = reliability(p, labels, bins=5)
    assert [round(b.lower, 2) for b in bins] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert [b.count for b in bins] == [3, 0, 0, 0, 3]  # 0.55, 0.45 (confidence 0.55), 0.5; 0.95, 0.05, 1.0
    first, last = bins[0], bins[-1]
    assert first.confidence == pytest.approx((0.55 + 0.55 + 0.5) / 3)
    assert first.accuracy == pytest.approx(1 / 3)  # 0.45 picked rejected, 0.5 is a tie: only 0.55 is right
    assert last.accuracy == 1.0 and bins[1].confidence is None and bins[1].accuracy is None
    ece = expected_calibration_error(p, labels, bins=5)
    assert ece == pytest.approx((3 * abs(1 / 3 - first.confidence) + 3 * abs(1.0 - last.confidence)) / 6)


def test_degenerate_inputs_raise_clearly_or_keep_temperature_one():
    with pytest.raises(CalibrationError, match="no pairs"):
        fit_temperature([])
    with pytest.raises(CalibrationError, match="one label per margin"):
        fit_temperature([0.1, 0.2], [1])
    with pytest.raises(CalibrationError, match="NaN"):
        fit_temperature([0.1, float("nan")])
    # Every pair on the right side: no finite maximum-likelihood T, but Platt's prior keeps it inside the bounds.
    t = fit_temperature(np.linspace(0.1, 1.0, 200))
    assert T_MIN < t < 1.0
    # Every pair on the wrong side: the model carries no usable confidence, T goes to its upper bound.
    assert fit_temperature(-np.linspace(0.1, 1.0, 200)) == pytest.approx(T_MAX, rel=1e-3)
    # calibrate() is what a publish calls: it never raises, it keeps T = 1 and says why.
    for margins, why in (([], "fewer than"), ([0.3] * 5, "fewer than"), ([float("inf")] * 40, "NaN or infinite")):
        cal = calibrate(margins)
        assert cal.temperature == 1.0 and why in cal.note and cal.ece is None
    assert np.isnan(expected_calibration_error([]))


def test_versions_without_a_temperature_read_as_one(tmp_path):
    assert temperature_of({}) == 1.0 and temperature_of({"calibration": {}}) == 1.0
    assert temperature_of({"calibration": {"temperature": -2}}) == 1.0  # never a sign flip or a division by 0
    assert temperature_of({"calibration": {"temperature": 0.25}}) == 0.25
    assert version_temperature(tmp_path) == 1.0  # a directory without a manifest (a training output)
    (tmp_path / "manifest.json").write_text(json.dumps({"calibration": calibrate(*synthetic(0.5, 2000)).to_manifest()}))
    assert version_temperature(tmp_path) == pytest.approx(0.5, rel=0.1)


def test_a_published_version_carries_its_temperature_and_the_scorer_reports_calibrated_p(tmp_path):
    """Stage 1 publishes gold and current with the temperature fitted on its held-out pairs; the
    scorer divides each version's margin by it and keeps the raw rewards on the record."""
    from schemas.codec import decode, encode
    from schemas.pairs import validate_pair
    from streams.runtime.processors.scorer import ModelSlot, Scorer, load_announced
    from tests.helpers import toy_pairs, write_jsonl
    from trainers.retrain import RetrainConfig, run_seed
    from trainers.scoring.model import RewardModel
    from trainers.storage.registry import ModelStore

    seed = write_jsonl(tmp_path / "seed.jsonl", [{k: v for k, v in p.items() if k != "extra"} for p in toy_pairs(100)])
    results = run_seed(RetrainConfig(seed_file=str(seed), models_dir=str(tmp_path / "models"),
                                     shards_dir=str(tmp_path / "shards"), max_steps=12, batch_size=8, max_length=64,
                                     learning_rate=1e-4, quantize=False))
    assert [r.decision for r in results] == ["published", "published"], [r.reason for r in results]
    store = ModelStore(tmp_path / "models")
    infos = {role: store.get(store.serving(role)) for role in ("current", "gold")}
    cal = infos["gold"].manifest["calibration"]
    assert cal["note"] == "" and cal["pairs"] == 20  # the 20% of the seed set Stage 1 holds out
    assert cal["fitted_on"].startswith("held-out slice") and cal["ece"] <= cal["ece_raw"]
    assert infos["current"].manifest["calibration"] == cal  # the same weights published again
    temperature = infos["current"].temperature
    assert temperature == cal["temperature"] and abs(np.log(temperature)) > 0.1 and "temperature" in results[0].reason

    loader = lambda rec: load_announced(rec, store=store)  # noqa: E731 - the worker's loader
    slots = {role: ModelSlot(role, loader) for role in infos}
    for role, slot in slots.items():
        slot.offer(store.version_record(infos[role].version, role, "promote", "test"))
        assert slot.swap_if_ready(), slot.failures
    pairs = [validate_pair({k: v for k, v in p.items() if k != "extra"}) for p in toy_pairs(6, seed=5)]
    scores = Scorer(slots["current"], slots["gold"]).score(pairs)
    for pair, s in zip(pairs, scores, strict=True):
        margin = s["reward_chosen"] - s["reward_rejected"]
        assert s["p"] == pytest.approx(float(calibrated_p(margin, temperature)), abs=1e-5)
        assert s["p"] != pytest.approx(float(calibrated_p(margin)), abs=1e-4)
        assert s["temperature"] == s["gold_temperature"] == temperature
        record = decode("ScoredPair", encode("ScoredPair", {"pair": pair, **s, "route": None, "route_reason": None}))
        assert record["temperature"] == temperature and record["reward_chosen"] == pytest.approx(s["reward_chosen"])

    # A version published without a calibration (e.g. `prefstream models publish`) is scored with T = 1.
    plain = store.publish(store.checkout(infos["current"].version), "current", promote=False)
    assert "calibration" not in plain.manifest and RewardModel.load(store.checkout(plain.version)).temperature == 1.0
