"""The retrain job (`prefstream retrain --role current|gold`): train, gate, export, publish.

1. Data from the shards: the current RM trains on gold + silver + flipped + verified_by_tool pairs,
   the new shards since the serving version plus a replay sample of older ones (so it does not
   forget); the gold RM trains on gold (human-verified) pairs only. A deterministic 10% of gold
   pairs (by pair_id hash) is the gold holdout and another 10% the validation slice for early
   stopping; neither is ever trained on.
2. Train warm-started from the serving version (or the packaged MiniLM before any exists), for
   ``epochs`` passes over the job's pairs, evaluating on the validation slice ``evals_per_epoch``
   times an epoch and keeping the best weights (early stopping). Every ``full_retrain_every``-th
   retrain, or when the pairs seen before outnumber the new ones ``full_retrain_old_ratio`` times, is
   a full retrain instead: from the role's base (its Stage 1 version) on every curated pair. The
   pairs a retrain trained on go into the version (trainers/chain.py), so its chain can be replayed.
3. Evaluate candidate and serving model on the gold holdout plus the fixed regression set; with no
   gold holdout yet, on a held-out slice of this job's data (the report says which).
4. Gate: holdout accuracy no worse than the serving model's (minus ``tolerance``) and no task
   category with enough pairs dropping by more than ``max_category_drop``. A failed gate keeps the
   old model and says why.
5. Fit the candidate's calibration temperature on the gold holdout (trainers/evaluation/calibration.py), export
   ONNX (INT8 only when its decisions agree with torch), publish atomically with the temperature in
   the manifest, announce.

Under torchrun (a Job with several GPUs) every rank collects the same data and trains its share;
rank 0 alone evaluates, gates, exports and publishes, then hands its result to the other ranks.

``--seed FILE`` is Stage 1: the first current and gold versions from a small verified seed set.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainers.chain import root_version, write_training_pairs
from trainers.evaluation.calibration import MANIFEST_KEY, MIN_CALIBRATION_PAIRS, calibrate
from trainers.exceptions import ExportError, TrainerError
from trainers.scoring.precision import PRECISIONS
from trainers.storage.registry import BOOTSTRAP_VERSION, Announcer, ModelStore, open_store
from trainers.training import distributed
from trainers.training.data import read_training_pairs, split_holdout
from trainers.training.selection import Collected, collect

# Fewer validation pairs than this make early stopping a coin toss: the job trains its planned steps instead.
MIN_VALIDATION_PAIRS = 20

# Pairs the export's torch-vs-ONNX agreement check runs on.
EXPORT_CHECK_PAIRS = 300


def _help(text: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    return field(metadata={"help": text} | ({"choices": choices} if choices else {}), **kw)


# RetrainConfig fields handed to the training run unchanged.
TRAIN_FIELDS = ("max_steps", "epochs", "patience", "batch_size", "learning_rate", "max_length", "freeze_layers", "freeze_embeddings",
                "grad_accum", "tokens_per_step", "device", "precision", "gradient_checkpointing", "lora_r",
                "lora_alpha", "lora_dropout", "lora_targets", "seed")


@dataclass
class RetrainConfig:
    role: str = _help("current (the served RM) or gold (the consistency-filter RM).", default="current")
    shards_dir: str | None = _help("The training shards: a directory (shards/<split>/*.avro) or s3://bucket/prefix; "
                                   "the CLI's default is PREFSTREAM_SHARDS_URL, else PREFSTREAM_SHARDS_DIR.",
                                   default=None)
    shards_cache_dir: str | None = _help("Where shards in object storage are mirrored for reading; the CLI's default "
                                         "is PREFSTREAM_SHARDS_CACHE_DIR or PREFSTREAM_HOME/shard-cache.", default=None)
    models_dir: str | None = _help("Model store: a directory or s3://bucket/prefix; the CLI's default is "
                                   "PREFSTREAM_MODELS_URL, else PREFSTREAM_MODELS_DIR.", default=None)
    models_cache_dir: str | None = _help("Where versions of an s3:// model store are downloaded and verified; the "
                                         "CLI's default is PREFSTREAM_MODELS_CACHE_DIR or PREFSTREAM_HOME/model-cache.",
                                         default=None)
    s3_endpoint: str | None = _help("S3 endpoint of an S3-compatible store; the CLI's default is "
                                    "PREFSTREAM_S3_ENDPOINT, else AWS_ENDPOINT_URL.", default=None)
    seed_file: str | None = _help("JSONL of verified pairs: train the first current and gold versions from it.",
                                  default=None)
    regression_file: str | None = _help("Fixed regression set (JSONL) evaluated with the gold holdout.", default=None)
    replay_fraction: float = _help("Share of pairs from shards the serving version already saw, replayed.", default=0.3)
    min_pairs: int = _help("Do not train on fewer pairs than this.", default=20)
    tolerance: float = _help("Gate: candidate accuracy may be this much below the serving model's.", default=0.02)
    max_category_drop: float = _help("Gate: no category (with >= min_category_pairs) may drop more than this.",
                                     default=0.1)
    min_category_pairs: int = _help("Categories with fewer holdout pairs are not gated individually.", default=10)
    eval_fraction: float = _help("Held-out share of this job's data when there is no gold holdout yet.", default=0.2)
    max_steps: int = _help("Optimizer steps; 0 = sized to the data (--epochs passes over the job's pairs).", default=0)
    epochs: float = _help("Passes over the job's pairs (new plus replay, or all in a full retrain) when "
                          "--max-steps is 0.", default=2.0)
    patience: int = _help("Early stopping: stop after this many evaluations on the gold validation slice without "
                          "a better accuracy and publish the best weights; 0 = train every planned step.", default=3)
    evals_per_epoch: int = _help("Evaluations on the gold validation slice per epoch (early stopping).", default=4)
    full_retrain_every: int = _help("Every Nth retrain of the role is a full retrain: from the role's base (its "
                                    "Stage 1 version) on every curated pair, gated like any candidate; 0 = only "
                                    "when --full-retrain-old-ratio says so.", default=3)
    full_retrain_old_ratio: float = _help("Also retrain in full when the pairs seen before outnumber the new ones "
                                          "this many times (the replay sample then covers little of them); "
                                          "0 = never for this reason.", default=4.0)
    batch_size: int = _help("Pairs per batch.", default=16)
    learning_rate: float = _help("Peak learning rate.", default=5e-5)
    max_length: int = _help("Tokens per (conversation, response).", default=256)
    freeze_layers: int = _help("Freeze this many lower layers (CPU-friendly).", default=0)
    freeze_embeddings: bool = _help("Freeze the token-embedding matrix (the training bench's CPU recipe).", default=True)
    grad_accum: int = _help("Micro-batches per optimizer step.", default=1)
    tokens_per_step: int = _help("Token budget per optimizer step instead of --grad-accum (see `prefstream train "
                                 "--help`); 0 = off.", default=0)
    device: str = _help("Where to train and evaluate: cpu, cuda, cuda:N or auto (cuda when a GPU is visible). "
                        "Under torchrun give cuda or auto: each rank takes the GPU of its LOCAL_RANK.", default="auto")
    precision: str = _help("fp32, bf16 or fp16 autocast over fp32 master weights (fp16 on CUDA only).",
                           default="fp32", choices=PRECISIONS)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass (less memory).", default=False)
    lora_r: int = _help("LoRA rank (needs the 'lora' extra); 0 = train all weights. The published model has the "
                        "adapters merged in.", default=0)
    lora_alpha: float = _help("LoRA scaling numerator (update scaled by lora_alpha / lora_r).", default=16.0)
    lora_dropout: float = _help("Dropout on the LoRA adapters' input.", default=0.0)
    lora_targets: str = _help("Layers that get adapters: auto, all-linear, or comma-separated module names.",
                              default="auto")
    quantize: bool = _help("Export model.int8.onnx when it agrees with torch.", default=True)
    seed: int = _help("Random seed.", default=0)

    def validate(self) -> None:
        if self.role not in ("current", "gold"):
            raise TrainerError(f"role {self.role!r} is not one of current, gold")
        for name in ("epochs", "evals_per_epoch"):
            if getattr(self, name) <= 0:
                raise TrainerError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("patience", "full_retrain_every", "full_retrain_old_ratio"):
            if getattr(self, name) < 0:
                raise TrainerError(f"{name} must be 0 or positive, got {getattr(self, name)}")
        for name in ("shards_dir", "models_dir"):
            if not getattr(self, name):
                raise TrainerError(f"{name} is not set: pass --{name.replace('_', '-')} (the CLI defaults to "
                                   f"PREFSTREAM_{name.upper()})")


@dataclass
class RetrainResult:
    role: str
    decision: str  # published | gate_failed | skipped
    reason: str
    version: str | None = None
    candidate: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # time per step: collect, train, evaluate, export, publish

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def pair_margins(rm: Any, pairs: list[dict]) -> np.ndarray:
    """r_chosen - r_rejected of each pair."""
    if not pairs:
        return np.zeros(0)
    rc, rr = rm.score_pairs(pairs)
    return np.asarray(rc, dtype=np.float64) - np.asarray(rr, dtype=np.float64)


def accuracy_report(rm: Any, pairs: list[dict], margins: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy overall and per category; ``margins`` when the pairs were scored already."""
    if not pairs:
        return {"accuracy": float("nan"), "n": 0, "by_category": {}}
    ok = (pair_margins(rm, pairs) if margins is None else margins) > 0
    cats: dict[str, list[bool]] = defaultdict(list)
    for p, o in zip(pairs, ok, strict=True):
        cats[p.get("task_category") or "unknown"].append(bool(o))
    return {"accuracy": float(np.mean(ok)), "n": len(pairs),
            "by_category": {c: {"accuracy": float(np.mean(v)), "n": len(v)} for c, v in cats.items()}}


def gate(cand: dict[str, Any], serv: dict[str, Any], cfg: RetrainConfig) -> tuple[bool, str]:
    if cand["accuracy"] < serv["accuracy"] - cfg.tolerance:
        return False, (f"holdout accuracy {cand['accuracy']:.4f} is below the serving model's {serv['accuracy']:.4f} "
                       f"by more than the tolerance {cfg.tolerance}")
    for cat, s in serv["by_category"].items():
        c = cand["by_category"].get(cat)
        if c and s["n"] >= cfg.min_category_pairs and s["accuracy"] - c["accuracy"] > cfg.max_category_drop:
            return False, (f"category {cat} drops from {s['accuracy']:.4f} to {c['accuracy']:.4f} "
                           f"(bound {cfg.max_category_drop})")
    return True, f"holdout accuracy {cand['accuracy']:.4f} vs serving {serv['accuracy']:.4f} on {cand['n']} pairs"


def _serving_model(base: str, max_length: int, device: str) -> Any:
    """The serving model from its verified checkout, or the bootstrap model when ``base`` is "default"."""
    from trainers.scoring.model import RewardModel

    if base == "default":
        import torch

        torch.manual_seed(0)
        return RewardModel.default(max_length=max_length, device=device)
    return RewardModel.load(base, max_length=max_length, device=device)


def train_config(cfg: RetrainConfig, output_dir: str, base_model: str, n_pairs: int = 0,
                 early_stopping: bool = False) -> Any:
    """The TrainConfig of a retrain: the shared fields as given; with ``early_stopping``, evaluations on the
    validation slice ``evals_per_epoch`` times an epoch of ``n_pairs``, else one at the end and no stopping."""
    from trainers.training.train import TrainConfig

    fields = {name: getattr(cfg, name) for name in TRAIN_FIELDS}
    eval_every = 0
    if early_stopping and cfg.patience:
        steps_per_epoch = math.ceil(n_pairs / (cfg.batch_size * cfg.grad_accum))
        eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    else:
        fields["patience"] = 0
    return TrainConfig(output_dir=output_dir, base_model=base_model, eval_every=eval_every, progress=True, **fields)


def _since_full(store: ModelStore, serving: str | None) -> int:
    """Retrains since the serving version's line last trained in full (or from Stage 1)."""
    return int(store.get(serving).manifest.get("lineage", {}).get("since_full", 0)) if serving else 0


def plan_data(cfg: RetrainConfig, store: ModelStore) -> tuple[Collected, str, str]:
    """(the data, the mode: incremental or full, why) of a retrain read from the shards."""
    serving = store.serving(cfg.role)
    if serving is not None and cfg.full_retrain_every and _since_full(store, serving) + 1 >= cfg.full_retrain_every:
        return collect(cfg, store, full=True), "full", f"every {cfg.full_retrain_every}th retrain is a full retrain"
    data = collect(cfg, store)
    new = data.lineage["new_pairs"]
    if serving is not None and cfg.full_retrain_old_ratio and data.old_pairs > cfg.full_retrain_old_ratio * max(1, new):
        return (collect(cfg, store, full=True), "full",
                f"{data.old_pairs} pairs seen before outnumber the {new} new ones more than "
                f"{cfg.full_retrain_old_ratio:g} times")
    return data, "incremental", "new pairs plus a replay sample, from the serving version"


def _export_checked(model_dir: Path, pairs: list[dict], quantize: bool) -> str:
    """Export ONNX checked against torch; what to add to the decision's reason ('' when all went as asked)."""
    from trainers.export.onnx import export

    try:
        export(model_dir, pairs, quantize=quantize)
    except ExportError as exc:
        # INT8 disagreed with torch: serve the fp32 ONNX instead of a model that decides differently.
        export(model_dir, pairs, quantize=False)
        return f"; INT8 export refused ({exc}); serving fp32 ONNX"
    return ""


def run_retrain(cfg: RetrainConfig, announce: Announcer | None = None, pairs: list[dict] | None = None,
                holdout: list[dict] | None = None, lineage: dict[str, Any] | None = None) -> RetrainResult:
    """Collect (unless the pairs are given: Stage 1 and tests), train, gate, publish."""
    from trainers.training.train import train

    cfg.validate()
    clock = {"t": time.perf_counter()}
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock["t"], 1)
        clock["t"] = now

    assert cfg.models_dir is not None  # cfg.validate() raised if it is unset
    store = open_store(cfg.models_dir, cfg.models_cache_dir, cfg.s3_endpoint)
    validation: list[dict] = []
    serving_version = store.serving(cfg.role) or BOOTSTRAP_VERSION
    base_version = serving_version
    if pairs is None:
        data, mode, why = plan_data(cfg, store)
        pairs, holdout, validation, lineage = data.pairs, data.holdout, data.validation, data.lineage
        if mode == "full":
            base_version = root_version(store, serving_version)
    else:
        mode, why = ("seed", "Stage 1 from the seed file") if (lineage or {}).get("seed_file") else ("incremental", "given pairs")
    holdout, lineage = holdout or [], dict(lineage or {})
    early = len(validation) >= MIN_VALIDATION_PAIRS
    lineage |= {"mode": mode, "mode_reason": why, "base_version": base_version,
                "since_full": 0 if mode != "incremental" else _since_full(store, store.serving(cfg.role)) + 1,
                "early_stopping": (f"on {len(validation)} gold validation pairs" if early and cfg.patience else
                                   f"off ({len(validation)} gold validation pairs; {MIN_VALIDATION_PAIRS} needed)"
                                   if cfg.patience else "off")}
    held_out = len(holdout)  # gold holdout pairs, ahead of any regression pairs: the calibration set
    if cfg.regression_file:
        from trainers.evaluation.evaluate import read_regression_pairs

        # Any layout `prefstream eval` reads (RewardBench, RM-Bench, RMB, JudgeBench, ours): a
        # benchmark file is the natural regression set, and read_training_pairs would drop its rows unseen.
        holdout = holdout + read_regression_pairs(cfg.regression_file)
    if len(pairs) < cfg.min_pairs:
        return RetrainResult(cfg.role, "skipped", f"{len(pairs)} training pairs, fewer than min_pairs={cfg.min_pairs}")
    eval_set_name = "gold holdout"
    if not holdout:
        pairs, holdout = split_holdout(pairs, cfg.eval_fraction, cfg.seed)
        eval_set_name = "held-out slice of this job's data (no gold holdout yet)"
        held_out = len(holdout)
    base = "default" if base_version == BOOTSTRAP_VERSION else str(store.checkout(base_version))
    lap("collect")
    ranks = distributed.ranks()
    with tempfile.TemporaryDirectory(prefix="prefstream-retrain-") as tmp:
        tcfg = train_config(cfg, str(Path(tmp) / "model"), base, len(pairs), early_stopping=early)
        trained = train(tcfg, pairs, validation if early else holdout[: min(len(holdout), 200)])
        lap("train")
        result = None
        if ranks.is_main:
            write_training_pairs(trained.output_dir, pairs)
            lineage |= {k: trained.metrics.get(k) for k in ("steps", "planned_steps", "best_step", "stopped_early")}
            serving_dir = "default" if serving_version == BOOTSTRAP_VERSION else str(store.checkout(serving_version))
            result = _gate_and_publish(cfg, store, trained, pairs, holdout, serving_version, serving_dir,
                                       {"eval_set": eval_set_name, "lineage": lineage, "seconds": seconds, "lap": lap,
                                        "calibration_set": _calibration_set(held_out, len(holdout), eval_set_name)},
                                       announce)
        # Every rank returns rank 0's result, so that all take the same path through run_seed.
        return RetrainResult(**distributed.broadcast_json(asdict(result) if result else None, trained.device, ranks))


def _calibration_set(held_out: int, evaluated: int, eval_set_name: str) -> tuple[int, str]:
    """(how many of the evaluation pairs, from the front, to fit the temperature on; what they are).

    The gold holdout (or the held-out slice of the job's data) was never trained on: the fit's set.
    When it is too small to fit, the whole evaluation set (with the regression pairs) is used instead.
    """
    if held_out >= MIN_CALIBRATION_PAIRS or held_out == evaluated:
        return held_out, eval_set_name
    return evaluated, f"{eval_set_name} and the regression set ({held_out} held-out pairs alone are too few)"


def _gate_and_publish(cfg: RetrainConfig, store: ModelStore, trained: Any, pairs: list[dict], holdout: list[dict],
                      serving_version: str, serving_dir: str, run: dict[str, Any],
                      announce: Announcer | None) -> RetrainResult:
    """Evaluate candidate and serving model, gate, export and publish: rank 0's part of a retrain."""
    from trainers.scoring.model import RewardModel

    margins = pair_margins(RewardModel.load(trained.output_dir, device=trained.device), holdout)
    cand = accuracy_report(None, holdout, margins)
    serv = accuracy_report(_serving_model(serving_dir, cfg.max_length, trained.device), holdout)
    run["lap"]("evaluate")
    ok, why = gate(cand, serv, cfg)
    result = RetrainResult(cfg.role, "published" if ok else "gate_failed", f"{why} ({run['eval_set']})",
                           candidate=cand, serving=serv | {"version": serving_version}, lineage=run["lineage"],
                           seconds=run["seconds"])
    if not ok:
        return result
    n, fitted_on = run["calibration_set"]
    calibration = calibrate(margins[:n], fitted_on=fitted_on)  # never raises: T = 1 when it cannot fit
    result.reason += f"; {calibration.describe()}"
    result.candidate["temperature"] = calibration.temperature
    result.reason += _export_checked(trained.output_dir, holdout[:EXPORT_CHECK_PAIRS] or pairs[:EXPORT_CHECK_PAIRS],
                                     cfg.quantize)
    run["lap"]("export")
    metrics = {"holdout_accuracy": cand["accuracy"], "serving_holdout_accuracy": serv["accuracy"],
               "holdout_pairs": cand["n"], "train_pairs": len(pairs), "final_loss": trained.metrics["final_loss"]}
    info = store.publish(trained.output_dir, cfg.role, parent=None if serving_version == BOOTSTRAP_VERSION else serving_version,
                         lineage=run["lineage"], metrics=metrics, announce=announce, reason=result.reason,
                         calibration=calibration.to_manifest())
    run["lap"]("publish")
    result.version = info.version
    return result


def run_seed(cfg: RetrainConfig, announce: Announcer | None = None) -> list[RetrainResult]:
    """Stage 1: the first gold and current versions from a verified seed file.

    Both roles would train on the same pairs with the same config and seed, so the model is
    trained once (as gold) and the same weights are published again as current.
    """
    if cfg.seed_file is None:
        raise TrainerError("run_seed needs a seed file: pass --seed-file")
    seed_pairs = list(read_training_pairs(Path(cfg.seed_file)))
    if not seed_pairs:
        raise TrainerError(f"the seed file {cfg.seed_file} holds no usable pairs")
    lineage = {"seed_file": str(cfg.seed_file), "seed_pairs": len(seed_pairs)}
    gold = run_retrain(RetrainConfig(**(asdict(cfg) | {"role": "gold"})), announce, pairs=list(seed_pairs), holdout=[],
                       lineage=lineage)
    if gold.decision != "published":
        return [gold, RetrainResult("current", gold.decision, f"not published: the gold model was not ({gold.reason})")]
    assert cfg.models_dir is not None  # the gold run validated this same config
    store = open_store(cfg.models_dir, cfg.models_cache_dir, cfg.s3_endpoint)
    if store.serving("current") is not None:  # every rank reads it after rank 0 published gold
        # Re-running Stage 1 with a current model in place would replace it unchecked: gate as usual.
        return [gold, run_retrain(RetrainConfig(**(asdict(cfg) | {"role": "current"})), announce, pairs=list(seed_pairs),
                                  holdout=[], lineage=lineage)]
    if not distributed.ranks().is_main:  # rank 0 publishes; its result is the one printed
        return [gold, RetrainResult("current", "published", gold.reason, candidate=gold.candidate, lineage=lineage)]
    assert gold.version is not None  # a published result names the version it published
    src = store.get(gold.version)
    # Same weights, same held-out pairs: the gold version's temperature holds for current too.
    info = store.publish(store.checkout(gold.version), "current", parent=None, lineage=lineage, metrics=src.metrics, announce=announce,
                         reason=gold.reason, calibration=src.manifest.get(MANIFEST_KEY))
    current = RetrainResult("current", "published", gold.reason, version=info.version, candidate=gold.candidate,
                            serving=gold.serving, lineage=lineage)
    return [gold, current]
