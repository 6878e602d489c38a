"""Temperature scaling of a reward model's preference probability, and how well it is calibrated.

The scorer's probability that the labelled chosen response is the better one is
``p = sigmoid((r_chosen - r_rejected) / T)``. A Bradley-Terry model trained for a few hundred steps
has small margins (|margin| about 0.5), so with T = 1 it is far less confident than it is right;
one temperature per version, fitted on held-out gold pairs at publish time, makes p a probability
that thresholds such as the router's ``tau`` can be read as.

Conventions:

- ``margins`` are ``r_chosen - r_rejected``; ``labels`` say whether the chosen response really is
  the better one (1) or not (0). Gold-oriented holdout pairs are all label 1 (the default).
- The fit minimises the negative log-likelihood of ``sigmoid(margin / T)`` over ``log T`` in
  [T_MIN, T_MAX] by golden-section search (the likelihood is convex in 1/T, so unimodal in log T).
  Each pair is oriented so its label is 1 and its target is Platt's ``(N + 1) / (N + 2)`` instead of
  1, which keeps T finite when every pair is on the right side (a perfectly separated holdout).
- Calibration error is over *confidence* ``max(p, 1 - p)`` against whether the model picked the right
  response (a tie is wrong): a pair's orientation is arbitrary, so p and 1 - p carry the same
  information. Bins are equal-width over [0.5, 1]; ECE is the count-weighted mean |accuracy -
  confidence| over the bins.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainers.exceptions import CalibrationError

__all__ = ["DEFAULT_BINS", "MANIFEST_KEY", "MIN_CALIBRATION_PAIRS", "T_MAX", "T_MIN", "Calibration", "ReliabilityBin",
           "calibrate", "calibrated_p", "calibration_report", "expected_calibration_error", "fit_temperature",
           "reliability", "temperature_of", "version_temperature"]

# Bounds of the search, wide because margins scale with training: MiniLM after Stage 1's 15 steps has
# a median |margin| of about 0.02 and fits T about 0.015, a long-trained reward model margins of 10 and
# more. At T_MAX every p is within 0.01 of 0.5 for margins under 400: no usable confidence.
T_MIN, T_MAX = 1e-4, 1e4
# Fewer held-out pairs than this and the fitted T is mostly noise: the version keeps T = 1.
MIN_CALIBRATION_PAIRS = 20
DEFAULT_BINS = 10
# Golden-section steps on log T: the bracket (18.4 wide) shrinks by 0.618 per step, to ~1e-11 after 60.
_SEARCH_STEPS = 60
MANIFEST_KEY = "calibration"  # where a version's manifest keeps its Calibration


def _arrays(margins: Any, labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    y = np.ones_like(m) if labels is None else np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(y) != len(m):
        raise CalibrationError(f"{len(m)} margins but {len(y)} labels; pass one label per margin")
    if not np.isin(y, (0.0, 1.0)).all():
        raise CalibrationError("labels must be 0 or 1 (1: the chosen response is the better one)")
    if not np.isfinite(m).all():
        raise CalibrationError(f"{int((~np.isfinite(m)).sum())} margins are NaN or infinite; drop those pairs or fix "
                               "the model that scored them")
    return m, y


def calibrated_p(margins: Any, temperature: float = 1.0) -> np.ndarray:
    """``sigmoid(margin / temperature)``, as float64."""
    x = np.asarray(margins, dtype=np.float64) / temperature
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def fit_temperature(margins: Any, labels: Any = None) -> float:
    """The T in [T_MIN, T_MAX] that minimises the NLL of ``sigmoid(margin / T)`` against ``labels``.

    Raises CalibrationError for no pairs, mismatched lengths, labels other than 0/1, or non-finite margins.
    """
    m, y = _arrays(margins, labels)
    if not len(m):
        raise CalibrationError("no pairs to fit a temperature on; pass at least one margin")
    z = np.where(y == 1.0, m, -m)  # every pair oriented so that its label is 1
    target = (len(z) + 1) / (len(z) + 2)  # Platt's prior: a finite T even when every pair is right

    def nll(log_t: float) -> float:
        x = z / math.exp(log_t)
        # -log sigmoid(x) = logaddexp(0, -x), stable for any x.
        return float(np.mean(target * np.logaddexp(0.0, -x) + (1 - target) * np.logaddexp(0.0, x)))

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(min(T_MAX, max(T_MIN, math.exp((lo + hi) / 2))))


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: pairs whose confidence max(p, 1 - p) is in [lower, upper)."""

    lower: float
    upper: float
    confidence: float | None  # mean confidence of the pairs in the bin; None when it is empty
    accuracy: float | None  # share of them where the model picked the better response
    count: int


def reliability(p: Any, labels: Any = None, bins: int = DEFAULT_BINS) -> list[ReliabilityBin]:
    """Reliability-diagram bins (equal width over confidence [0.5, 1]; the last one includes 1)."""
    if bins < 1:
        raise CalibrationError(f"bins={bins}: give at least one bin")
    probs, y = _arrays(p, labels)
    if ((probs < 0) | (probs > 1)).any():
        raise CalibrationError("probabilities must lie in [0, 1]")
    confidence = np.maximum(probs, 1 - probs)
    right = np.where(y == 1.0, probs > 0.5, probs < 0.5)  # p = 0.5 picks neither: a tie is wrong
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]),
                                  float(confidence[sel].mean()) if n else None, float(right[sel].mean()) if n else None, n))
    return out


def expected_calibration_error(p: Any, labels: Any = None, bins: int = DEFAULT_BINS) -> float:
    """Count-weighted mean |accuracy - confidence| over the reliability bins; NaN for no pairs."""
    table = reliability(p, labels, bins)
    total = sum(b.count for b in table)
    if not total:
        return float("nan")
    # A bin has a confidence and an accuracy exactly when it has pairs (reliability() builds it so).
    return float(sum(b.count * abs(b.accuracy - b.confidence) for b in table
                     if b.accuracy is not None and b.confidence is not None) / total)


def calibration_report(margins: Any, temperature: float = 1.0, labels: Any = None,
                       bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """How calibrated a version is on evaluation pairs: ECE with its temperature and with T = 1, the
    reliability bins with its temperature, and the temperature these pairs alone would give."""
    m, y = _arrays(margins, labels)
    p = calibrated_p(m, temperature)
    return {"temperature": float(temperature), "pairs": len(m),
            "ece": expected_calibration_error(p, y, bins),
            "ece_uncalibrated": expected_calibration_error(calibrated_p(m), y, bins),
            "best_temperature": fit_temperature(m, y) if len(m) else None,
            "reliability": [asdict(b) for b in reliability(p, y, bins)]}


@dataclass(frozen=True)
class Calibration:
    """A version's temperature and how calibrated p is with and without it, on the pairs it was fitted on."""

    temperature: float
    pairs: int
    fitted_on: str
    ece_raw: float | None = None  # ECE of sigmoid(margin), T = 1
    ece: float | None = None  # ECE of sigmoid(margin / temperature)
    bins: int = DEFAULT_BINS
    note: str = ""  # why T = 1 was kept, when it was

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One phrase for a decision's reason."""
        if self.note:
            return f"temperature 1 kept ({self.note})"
        return (f"calibrated: temperature {self.temperature:.3g}, ECE {self.ece_raw:.3f} -> {self.ece:.3f} on "
                f"{self.pairs} pairs ({self.fitted_on})")


def calibrate(margins: Any, labels: Any = None, fitted_on: str = "gold holdout", bins: int = DEFAULT_BINS,
              min_pairs: int = MIN_CALIBRATION_PAIRS) -> Calibration:
    """Fit T and measure ECE before and after; never raises on the data (a publish must not fail here).

    With fewer than ``min_pairs`` pairs, or margins that cannot be used, T = 1 and ``note`` says why.
    """
    try:
        m, y = _arrays(margins, labels)
    except CalibrationError as exc:
        return Calibration(1.0, int(np.size(margins)), fitted_on, bins=bins, note=str(exc))
    if len(m) < min_pairs:
        return Calibration(1.0, len(m), fitted_on, bins=bins,
                           note=f"{len(m)} held-out pairs, fewer than the {min_pairs} a fit needs")
    t = fit_temperature(m, y)
    return Calibration(t, len(m), fitted_on, expected_calibration_error(calibrated_p(m), y, bins),
                       expected_calibration_error(calibrated_p(m, t), y, bins), bins)


def temperature_of(manifest: dict[str, Any]) -> float:
    """The temperature a version's manifest carries; 1.0 for a version published without one."""
    entry = manifest.get(MANIFEST_KEY) if isinstance(manifest, dict) else None
    t = entry.get("temperature") if isinstance(entry, dict) else None
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and T_MIN <= t <= T_MAX:
        return float(t)
    return 1.0


def version_temperature(directory: str | Path) -> float:
    """The temperature in the manifest of a model directory (a version's checkout); 1.0 without one."""
    from trainers.storage.files import MANIFEST

    path = Path(directory) / MANIFEST
    try:
        return temperature_of(json.loads(path.read_text()))
    except (OSError, ValueError):  # no manifest (a training output, a downloaded model) or not ours
        return 1.0
