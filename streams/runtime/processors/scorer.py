"""The scorer: current and gold reward models, micro-batched, with hot-swap from models.versions.

A ``ModelSlot`` serves one role. A watcher thread follows the compacted ``models.versions``
topic; a new version is verified (manifest sha256 and every file), loaded and warmed up *in that
thread* (a batch of the pairs the role scored last goes through the whole scoring path, so the
first-call costs of ONNX Runtime or CUDA are paid there), then parked as ``pending``. The worker
calls ``swap_if_ready()`` between batches, a pointer switch, so a batch is always scored by one
fully loaded model, and a failed load leaves the old model serving.

Each version is scored with its own calibration temperature (from its manifest, 1.0 for versions
published without one): ``p = sigmoid((r_chosen - r_rejected) / T)``, and likewise ``gold_p``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streams.exceptions import ConfigError, ModelRefusedError, UntrustedModelPathError
from streams.runtime import metrics
from streams.runtime.processors.stage import Item, Stage
from trainers.exceptions import CorruptArtifactError, DeviceError, UnknownVersionError
from trainers.scoring.devices import cpu_dtype_refusal, resolve_device, resolve_dtype
from trainers.scoring.model import ONNX_FP32, ONNX_INT8, RewardModel, sigmoid
from trainers.storage.files import verify_dir
from trainers.storage.registry import BOOTSTRAP_VERSION, ROLES, ModelStore, sha256_file

log = logging.getLogger(__name__)

# Pairs a new version scores before it is parked: the last ones its role scored (so the warm-up sees
# real lengths), or WARM_UP_PAIRS before any were scored.
WARM_UP_SIZE = 8
WARM_UP_PAIRS = [{"conversation": [{"role": "user", "content": f"Question {i}: how do I keep a reward model fresh?"}],
                  "chosen": "Retrain it on curated preference pairs and swap it in between batches. " * (1 + i % 3),
                  "rejected": "Never change it."} for i in range(WARM_UP_SIZE)]


@dataclass
class Loaded:
    model: Any
    version: str
    load_seconds: float = 0.0
    warm_up_seconds: float = 0.0
    warmed_up_with: int = 0  # pairs the model scored before it was parked (0: never warmed, e.g. the bootstrap)


@dataclass
class SwapEvent:
    role: str
    version: str
    load_seconds: float
    swapped_at: float
    warm_up_seconds: float = 0.0


@dataclass
class ModelSlot:
    role: str
    loader: Callable[[dict], Any]
    serving: Loaded | None = None
    pending: Loaded | None = None
    failures: list[str] = field(default_factory=list)
    swaps: list[SwapEvent] = field(default_factory=list)
    warm_up_pairs: list[dict] = field(default_factory=lambda: list(WARM_UP_PAIRS))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def remember(self, pairs: list[dict]) -> None:
        """Keep the last pairs scored (the worker's thread) as the next version's warm-up batch."""
        if pairs:
            self.warm_up_pairs = pairs[-WARM_UP_SIZE:]

    def offer(self, record: dict) -> None:
        """Load, verify and warm up the announced version, then park it (call from the watcher thread)."""
        version = record["version"]
        with self._lock:
            if (self.serving and self.serving.version == version) or (self.pending and self.pending.version == version):
                return
        t0 = time.perf_counter()
        announced = record.get("announced_at")
        seen_after = f"{time.time() - announced / 1000:.2f} s" if isinstance(announced, (int, float)) else "?"
        try:
            model = self.loader(record)
            t1 = time.perf_counter()
            warm = self.warm_up_pairs
            model.score_pairs(warm)  # first-call costs (ORT arena, CUDA kernels and allocator) paid here
        except Exception as exc:  # any failure keeps the old model serving
            msg = f"{self.role} version {version} refused: {exc}"
            log.error(msg)
            self.failures.append(msg)
            metrics.SWAP_FAILURES.labels(self.role).inc()
            return
        t2 = time.perf_counter()
        metrics.SWAP_SECONDS.labels(self.role).observe(t2 - t0)
        log.info("%s version %s seen %s after its announcement, loaded and verified in %.2f s, warmed up on %d pairs "
                 "in %.2f s", self.role, version, seen_after, t1 - t0, len(warm), t2 - t1)
        with self._lock:
            self.pending = Loaded(model, version, t1 - t0, t2 - t1, len(warm))

    def swap_if_ready(self) -> bool:
        """Serve the pending version, if one is parked: a pointer switch, between batches only."""
        with self._lock:
            if self.pending is None:
                return False
            self.serving, self.pending = self.pending, None
            self.swaps.append(SwapEvent(self.role, self.serving.version, self.serving.load_seconds, time.time(),
                                        self.serving.warm_up_seconds))
        metrics.SWAPS.labels(self.role).inc()
        log.info("%s model now %s", self.role, self.serving.version)
        return True


# Version names as ModelStore.publish makes them: <role>-<YYYYmmdd>-<HHMMSS>-<6 hex>. Anything else in
# an announcement is not a version this store made, so it is never joined into a path.
VERSION_NAME = re.compile(rf"(?:{'|'.join(ROLES)})-\d{{8}}-\d{{6}}-[0-9a-f]{{6}}")


def announced_version(record: Mapping[str, Any]) -> str:
    """The announced version name, or UntrustedModelPathError when it is not a name the store makes.

    models.versions is a topic anyone with write access can append to: only the version name of a
    record is used, resolved in the worker's own store; the record's path is never opened.
    """
    version = str(record.get("version", ""))
    if not VERSION_NAME.fullmatch(version):
        raise UntrustedModelPathError(f"version {version[:80]!r}: the version name is not one the model store makes "
                                      "(<role>-<date>-<time>-<6 hex>); publish with `prefstream` tools")
    return version


def resolve_announced(record: dict, store: ModelStore) -> Path:
    """The announced version, from the worker's own ``store``, on this machine and verified.

    The manifest must match the announced sha256 and every file the manifest (a download into the
    worker's cache for an S3 store). A name the store does not hold raises UntrustedModelPathError;
    a mismatch ModelRefusedError.
    """
    version = announced_version(record)
    try:
        return store.checkout(version, manifest_sha256=str(record.get("manifest_sha256", "")))
    except UnknownVersionError as exc:
        raise UntrustedModelPathError(f"{exc}; the announcement names a version this worker's store does not hold: "
                                      "publish into the store the workers read (PREFSTREAM_MODELS_URL or "
                                      "PREFSTREAM_MODELS_DIR)") from exc
    except CorruptArtifactError as exc:
        raise ModelRefusedError(f"{exc}") from exc


@dataclass(frozen=True)
class Placement:
    """Where and how the worker's reward models run (from PREFSTREAM_WORKER_DEVICE, _DTYPE, _TOKEN_BUDGET)."""

    device: str = "cpu"
    dtype: str = "fp32"
    token_budget: int | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def placement(device: str, dtype: str, token_budget: int | None = None) -> Placement:
    """The resolved device and dtype of the settings, or ConfigError saying what to change (at start)."""
    try:
        resolved = resolve_device(device)
        if refusal := cpu_dtype_refusal(dtype, resolved, "PREFSTREAM_WORKER_DTYPE"):
            raise ConfigError(refusal + (" (PREFSTREAM_WORKER_DEVICE=auto found no GPU)" if device == "auto" else ""))
        return Placement(resolved, resolve_dtype(dtype, resolved), token_budget)
    except DeviceError as exc:
        raise ConfigError(f"PREFSTREAM_WORKER_DEVICE / PREFSTREAM_WORKER_DTYPE: {exc}") from exc


def load_announced(record: dict, backend: str = "auto", max_length: int | None = None,
                   threads: int | None = None, models_dir: str | os.PathLike | None = None,
                   where: Placement = Placement(), store: ModelStore | None = None) -> RewardModel:
    """Verify a ModelVersion record against the model store, then load it.

    With ``store`` (the worker always gives it), or a directory store ``models_dir``, only the
    announced version name is used, resolved and verified in that store (resolve_announced); a
    refused announcement is counted in prefstream_model_announcements_refused_total. Without
    either, the record's path is trusted (tools loading what they published themselves).
    On a GPU (``where``) the version serves with torch in ``where.dtype``; on the CPU as below.
    """
    if store is None and models_dir is not None:
        store = ModelStore(models_dir)
    if store is not None:
        try:
            path = resolve_announced(record, store)
        except UntrustedModelPathError:
            metrics.ANNOUNCEMENTS_REFUSED.labels(record.get("role") if record.get("role") in ROLES else "other",
                                                 "outside_store").inc()
            raise
    else:
        path = Path(record["path"])
        manifest = path / "manifest.json"
        if not manifest.exists():
            raise ModelRefusedError(f"{manifest} does not exist; load versions through the model store")
        if sha256_file(manifest) != record["manifest_sha256"]:
            raise ModelRefusedError(f"manifest of {record['version']} does not match the announced sha256; "
                                    "re-announce the version from the store")
        verify_dir(path, record["version"], json.loads(manifest.read_text())["files"])
    onnx_file = next((f for f in (ONNX_INT8, ONNX_FP32) if (path / f).exists()), None)
    # auto on the CPU: INT8 ONNX when its export check passed, else the fp32 ONNX (faster than torch on
    # CPU), else torch. On a GPU: torch (the ONNX sessions here run on the CPU only).
    chosen = backend if backend != "auto" else ("torch" if where.on_gpu or not onnx_file else "onnx")
    rm = RewardModel.load(path, backend=chosen, max_length=max_length, threads=threads, onnx_file=onnx_file or ONNX_INT8,
                          device=where.device, dtype=where.dtype, token_budget=where.token_budget)
    probe = [{"conversation": [{"role": "user", "content": "ping"}], "chosen": "pong", "rejected": "no"}]
    rc, rr = rm.score_pairs(probe)  # a model that cannot score one pair never serves
    if not (np.isfinite(rc).all() and np.isfinite(rr).all()):
        raise ModelRefusedError(f"{record['version']} produced non-finite rewards; it is not served")
    return rm


def bootstrap_model(max_length: int, threads: int | None = None, where: Placement = Placement()) -> RewardModel:
    """Stage 1, before any version exists: the untrained default (MiniLM, seeded head).

    On the CPU it is served on ONNX Runtime like trained versions, through an in-memory export (~3 s
    at start): measured 1.37x torch's pairs/s on batches and 71 vs 97 ms for a single pair.
    If the export fails, torch serves the same weights. On a GPU torch serves it there.
    """
    from trainers.exceptions import ExportError
    from trainers.export.onnx import onnx_twin

    if where.on_gpu:
        return RewardModel.default(max_length=max_length, device=where.device, dtype=where.dtype,
                                   token_budget=where.token_budget)
    try:
        return onnx_twin(RewardModel.default(max_length=max_length, attn_implementation="eager"), threads)
    except ExportError as exc:
        log.warning("bootstrap model: %s; serving it with torch", exc)
        return RewardModel.default(max_length=max_length)  # same seed, same weights; torch's faster attention


class Scorer:
    def __init__(self, current: ModelSlot, gold: ModelSlot) -> None:
        self.current, self.gold = current, gold

    def swap_if_ready(self) -> None:
        swapped = [self.current.swap_if_ready(), self.gold.swap_if_ready()]  # both, never short-circuit
        if any(swapped):
            self.export_versions()

    def export_versions(self) -> None:
        metrics.MODEL_VERSION.info({"current": self.versions()[0], "gold": self.versions()[1] or "none"})

    def versions(self) -> tuple[str, str | None]:
        return (self.current.serving.version if self.current.serving else BOOTSTRAP_VERSION,
                self.gold.serving.version if self.gold.serving else None)

    def score(self, pairs: list[dict]) -> list[dict]:
        """ScoredPair fields (without the pair) for each pair, from the models serving right now.

        p and gold_p are calibrated with each version's temperature; the rewards stay raw.
        """
        cur, gold = self.current.serving, self.gold.serving
        if cur is None:  # the current slot serves the bootstrap model from the start
            raise RuntimeError("no current model is serving")
        rc, rr = cur.model.score_pairs(pairs)
        p = sigmoid((rc - rr) / cur.model.temperature)
        if gold is not None:
            gc, gr = gold.model.score_pairs(pairs)
            gp = sigmoid((gc - gr) / gold.model.temperature)
        # Pairs both models scored: the next version's warm-up (a pair that broke a model never is).
        self.current.remember(pairs)
        self.gold.remember(pairs)
        out = []
        now = int(time.time() * 1000)
        for i in range(len(pairs)):
            out.append({
                "reward_chosen": float(rc[i]), "reward_rejected": float(rr[i]), "p": float(p[i]),
                "model_version": cur.version, "temperature": float(cur.model.temperature),
                "gold_reward_chosen": float(gc[i]) if gold else None, "gold_reward_rejected": float(gr[i]) if gold else None,
                "gold_p": float(gp[i]) if gold else None, "gold_model_version": gold.version if gold else None,
                "gold_temperature": float(gold.model.temperature) if gold else None,
                "scored_at": now,
            })
        metrics.SCORED.inc(len(pairs))
        metrics.MISPREDICTED.inc(int((p < 0.5).sum()))
        metrics.BATCH_SIZE.observe(len(pairs))
        return out


class ScoreStage(Stage[dict]):
    """The current (and gold) reward model's scores of each pair (``Item.score``)."""

    name = timer = "score"
    second_look = True

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def run(self, items: list[Item]) -> list[dict]:
        return self.scorer.score([i.pair for i in items])

    def keep(self, item: Item, result: dict) -> None:
        item.score = result
