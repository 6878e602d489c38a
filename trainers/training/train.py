"""Bradley-Terry reward-model training (`prefstream train`).

Loss per pair: ``-log sigmoid(r_chosen - r_rejected - margin)``, plus the optional reward-centering
term ``coef * mean((r_chosen + r_rejected)^2)`` (TRL's ``center_rewards_coefficient``).
Chosen and rejected go through the model in one forward pass, in length-grouped batches padded
only to their own longest member: on a CPU, padding is most of the cost of a naive loop.

At the scale of large decoder reward models: bf16/fp16 autocast over fp32 master weights
(trainers/scoring/precision.py), gradient checkpointing, LoRA adapters merged before saving
(trainers/training/lora.py), gradient accumulation to a token budget, checkpoints to resume from
(trainers/training/checkpoint.py) and data-parallel ranks under torchrun (trainers/training/distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainers.exceptions import TrainerError
from trainers.scoring.devices import resolve_device
from trainers.scoring.model import RewardModel, default_base_path
from trainers.scoring.precision import autocast, check_precision, grad_scaler
from trainers.training import checkpoint, distributed
from trainers.training.config import TrainConfig, TrainResult
from trainers.training.data import read_pairs, split_holdout
from trainers.training.distributed import Ranks
from trainers.training.early_stopping import Best, early_stop, restore_best
from trainers.training.lora import apply_lora, merge_lora
from trainers.training.recipe import (
    TrainingProgress,
    disable_dropout,
    freeze_lower_layers,
    length_grouped_batches,
    plot_curve,
    step_batches,
)
from trainers.training.steps import HEAD_PREFIXES, StepRunner, _encode, _Encoded

# Passes of 2 x 4 sequences: measured 1.16-1.34x faster than whole batches of 16 on a 2-core CPU
# when a pass held whole pairs; sorting sequences on their own gained 1.04-1.05x more (see steps._rewards).
CPU_CHUNK_PAIRS = 4


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pair_accuracy(rm: RewardModel, pairs: list[dict]) -> float:
    """Share of pairs where chosen scores strictly above rejected (a tie counts as wrong)."""
    return held_out_scores(rm, pairs)[0]


def held_out_scores(rm: RewardModel, pairs: list[dict]) -> tuple[float, float]:
    """(accuracy, mean Bradley-Terry loss) on ``pairs``: a tie counts as wrong; NaN for no pairs."""
    if not pairs:
        return float("nan"), float("nan")
    rc, rr = rm.score_pairs(pairs)
    margin = np.asarray(rc, dtype=np.float64) - np.asarray(rr, dtype=np.float64)
    return float(np.mean(margin > 0)), float(np.mean(np.logaddexp(0.0, -margin)))


def _load_base(cfg: TrainConfig, device: str) -> RewardModel:
    path = default_base_path() if cfg.base_model == "default" else Path(cfg.base_model)
    # Eager attention trains ~10% faster than SDPA on CPU for short, already length-grouped batches;
    # on a GPU the fused SDPA kernels win, so the model's default is kept there.
    return RewardModel.load(path, max_length=cfg.max_length, batch_size=max(cfg.batch_size * 2, 32), device=device,
                            attn_implementation="eager" if device == "cpu" else None)


def _pairs_for(cfg: TrainConfig, train_pairs: list[dict] | None,
               eval_pairs: list[dict] | None) -> tuple[list[dict], list[dict]]:
    """The training and held-out pairs: as given, or read from cfg's files (split when no eval files)."""
    if train_pairs is None:
        cfg.validate()
        train_pairs = read_pairs(cfg.train_files)
    if eval_pairs is None:
        if cfg.eval_files:
            eval_pairs = read_pairs(cfg.eval_files)
        else:
            train_pairs, eval_pairs = split_holdout(train_pairs, cfg.eval_fraction, cfg.seed)
    if not train_pairs:
        raise TrainerError("no training pairs left after the held-out split; add pairs or lower --eval-fraction")
    return train_pairs, eval_pairs


def _freeze_head_bias(model: Any) -> None:
    """The head's bias cancels in r_chosen - r_rejected: it gets no gradient from the BT loss."""
    for name, param in model.named_parameters():
        if name.startswith(HEAD_PREFIXES) and name.endswith("bias"):
            param.requires_grad = False


def _prepare_trainable(model: Any, cfg: TrainConfig) -> Any:
    """Dropout, checkpointing, LoRA and freezing, as the config asks; the PeftModel when LoRA is on, else None.

    Dropout goes off before the adapters go in, so that --lora-dropout is kept; freezing comes after
    them, so that --freeze-layers also freezes the adapters of those layers.
    """
    model.train()
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainerError(f"{type(model).__name__} does not support gradient checkpointing; "
                               "train without --gradient-checkpointing")
        # Non-reentrant checkpointing gives the head and every trainable weight its gradient even when
        # the embeddings are frozen (the reentrant kind needs inputs that require grad).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) if cfg.lora_r else None
    freeze_lower_layers(model, cfg.freeze_layers)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad = False
    if not cfg.center_rewards_coefficient:
        _freeze_head_bias(model)
    return wrapped


def _optimizer(model: Any, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW with no weight decay on biases, norms and the head (its own learning rate), and a
    linear warm-up then linear decay schedule."""
    import torch

    head_names = {n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES)}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if n not in head_names and p.ndim > 1]
    no_decay = [p for n, p in trainable if n not in head_names and p.ndim <= 1]
    head = [p for n, p in trainable if n in head_names]
    optimizer = torch.optim.AdamW([
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.learning_rate},
        {"params": head, "weight_decay": 0.0, "lr": cfg.head_learning_rate},
    ])
    warmup = int(total_steps * cfg.warmup_ratio)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


@dataclass
class _Run:
    """What the training loop measured, and where it stands (all of it goes into a checkpoint)."""

    history: list[dict[str, float]] = field(default_factory=list)
    running_loss: list[float] = field(default_factory=list)
    steps: int = 0
    pairs_seen: int = 0
    tokens_seen: int = 0
    busy_s: float = 0.0  # seconds spent in training steps (evaluation excluded)
    batches: list[list[int]] = field(default_factory=list)  # this epoch's batches still to come
    resumed_from: str | None = None
    best: Best | None = None  # early stopping: the best evaluation so far and its weights

    def to_state(self, rng: random.Random) -> dict[str, Any]:
        return {"history": self.history, "running_loss": self.running_loss[-20:], "steps": self.steps,
                "pairs_seen": self.pairs_seen, "tokens_seen": self.tokens_seen, "busy_s": self.busy_s,
                "batches": self.batches, "batch_rng": checkpoint._py_state(rng.getstate())}

    @classmethod
    def from_state(cls, doc: dict[str, Any], rng: random.Random, path: str) -> _Run:
        rng.setstate(checkpoint.py_state_from(doc["batch_rng"]))
        return cls(doc["history"], doc["running_loss"], doc["steps"], doc["pairs_seen"], doc["tokens_seen"],
                   doc["busy_s"], doc["batches"], path)


@dataclass
class _Setup:
    """What the loop runs with besides the data."""

    rm: Any
    cfg: TrainConfig
    device: str
    ranks: Ranks
    total_steps: int


def _resume(path: Path, setup: _Setup, data: _Encoded, fingerprint: str, parts: dict[str, Any],
            rng: random.Random) -> _Run:
    doc = checkpoint.load(path, model=setup.rm.torch_model, device=setup.device, **parts)
    expect = {"total_steps": setup.total_steps, "data_sha256": fingerprint, "base_model": setup.cfg.base_model,
              "tokens_per_step": setup.cfg.tokens_per_step, "grad_accum": setup.cfg.grad_accum,
              "batch_size": setup.cfg.batch_size, "seed": setup.cfg.seed}
    differ = {k: (doc.get(k), v) for k, v in expect.items() if doc.get(k) != v}
    if differ:
        what = ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items())
        raise TrainerError(f"checkpoint {path} belongs to another run ({what}); resume with the run's data, "
                           "base model, steps and batching options")
    return _Run.from_state(doc, rng, str(path))


def _training_loop(setup: _Setup, data: _Encoded, eval_pairs: list[dict]) -> _Run:
    rm, cfg, device, ranks, total_steps = setup.rm, setup.cfg, setup.device, setup.ranks, setup.total_steps
    import torch

    model = rm.torch_model
    chunk = cfg.chunk_pairs if cfg.chunk_pairs >= 0 else (CPU_CHUNK_PAIRS if device == "cpu" else 0)
    optimizer, scheduler = _optimizer(model, cfg, total_steps)
    scaler = grad_scaler(cfg.precision, device)
    parts = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(cfg.seed)
    fingerprint = data.fingerprint() if cfg.checkpoint_every or cfg.resume_from else ""
    run = _Run()
    if cfg.resume_from:
        run = _resume(checkpoint.resolve(cfg.resume_from, cfg.output_dir), setup, data, fingerprint, parts, rng)
    runner = StepRunner(distributed.wrap(model, device, ranks), rm.formatter, data, cfg, device, chunk * 2, ranks)
    # Held-out scoring on a GPU runs in the training precision; on a CPU bf16 matmuls are slower than fp32.
    eval_ctx = (lambda: autocast(cfg.precision, device)) if device.startswith("cuda") else contextlib.nullcontext

    def refill() -> list[list[int]]:
        return length_grouped_batches(data.lengths, cfg.batch_size, rng)

    last_step = min(total_steps, cfg.stop_after) if cfg.stop_after else total_steps
    progress = TrainingProgress(cfg.progress and ranks.is_main, last_step, run.steps)
    try:
        while run.steps < last_step:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            micro = step_batches(run.batches, refill, data.tokens, cfg.grad_accum, cfg.tokens_per_step)
            step_loss = runner.backward(micro, scaler)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            run.steps += 1
            run.pairs_seen += sum(len(b) for b in micro)
            run.tokens_seen += sum(data.tokens[i] for b in micro for i in b)
            run.busy_s += time.perf_counter() - started
            run.running_loss.append(step_loss)
            row: dict[str, float] = {"step": run.steps, "loss": step_loss, "lr": scheduler.get_last_lr()[0]}
            if ranks.is_main and eval_pairs and ((cfg.eval_every and run.steps % cfg.eval_every == 0)
                                                 or run.steps == last_step):
                model.eval()
                with eval_ctx():
                    row["eval_accuracy"], row["eval_loss"] = held_out_scores(rm, eval_pairs)
                model.train()
            run.history.append(row)
            if "eval_accuracy" in row and early_stop(run, model, cfg, row):
                progress.update(f"stopped early: no better held-out accuracy in {cfg.patience} evaluations")
                break
            if ranks.is_main and cfg.checkpoint_every and run.steps % cfg.checkpoint_every == 0 \
                    and run.steps < total_steps:
                state = run.to_state(rng) | {"total_steps": total_steps, "data_sha256": fingerprint,
                                             "base_model": cfg.base_model, "tokens_per_step": cfg.tokens_per_step,
                                             "grad_accum": cfg.grad_accum, "batch_size": cfg.batch_size,
                                             "seed": cfg.seed}
                checkpoint.save(cfg.output_dir, run.steps, model=model, state=state, keep=cfg.keep_checkpoints,
                                **parts)
            progress.update(f"loss {np.mean(run.running_loss[-20:]):.4f}"
                            + (f" acc {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else ""))
    finally:
        progress.close()
    return run


def _total_steps(cfg: TrainConfig, data: _Encoded) -> int:
    if cfg.tokens_per_step:
        total_tokens = sum(data.tokens)
        if cfg.tokens_per_step > total_tokens:
            raise TrainerError(f"tokens_per_step {cfg.tokens_per_step} is more than the {total_tokens} tokens of all "
                               "the training pairs; lower --tokens-per-step or add data")
        steps_per_epoch = math.ceil(total_tokens / cfg.tokens_per_step)  # about: a step may overshoot its budget
    else:
        steps_per_epoch = math.ceil(len(data.tokens) / (cfg.batch_size * cfg.grad_accum))
    return cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))


def _fingerprints(model: Any) -> dict[str, tuple[float, float]]:
    """Sum and sum of squares (float64) of each trainable tensor: tells which changed without a second
    copy of the weights (a full copy of a large model would double its memory)."""
    import torch

    with torch.no_grad():
        return {n: (p.detach().double().sum().item(), p.detach().double().square().sum().item())
                for n, p in model.named_parameters() if p.requires_grad}


def train(cfg: TrainConfig, train_pairs: list[dict] | None = None, eval_pairs: list[dict] | None = None) -> TrainResult:
    """Train a reward model. Pairs may be given directly (tests, retrain jobs) or read from cfg's files.

    Under torchrun every rank calls this with the same pairs; rank 0 alone evaluates and writes the
    output, and all ranks return once it is written.
    """
    import torch

    cfg.check_options()
    train_pairs, eval_pairs = _pairs_for(cfg, train_pairs, eval_pairs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    ranks = distributed.ranks()
    device = distributed.rank_device(resolve_device(cfg.device), ranks)
    check_precision(cfg.precision, device)
    distributed.init(device, ranks)
    rm = _load_base(cfg, device)
    model = rm.torch_model
    wrapped = _prepare_trainable(model, cfg)
    data = _encode(rm, train_pairs, cfg.use_margin)
    total_steps = _total_steps(cfg, data)
    before = _fingerprints(model)
    trainable_weights = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.patience and ranks.distributed:
        raise TrainerError("early stopping (--patience) runs in one process: rank 0 alone evaluates; train under "
                           "torchrun with --patience 0")
    run = _training_loop(_Setup(rm, cfg, device, ranks, total_steps), data, eval_pairs)
    best_step = restore_best(run, model)
    model.eval()
    after = _fingerprints(model)
    unchanged = [n for n in before if before[n] == after[n]]
    if wrapped is not None:
        rm.torch_model = rm.backend.model = merge_lora(wrapped)
    final_eval = run.best.accuracy if run.best else next(
        (h["eval_accuracy"] for h in reversed(run.history) if "eval_accuracy" in h), float("nan"))
    metrics = {
        "steps": run.steps, "planned_steps": total_steps, "best_step": best_step,
        "stopped_early": run.steps < total_steps, "pairs_seen": run.pairs_seen, "tokens_seen": run.tokens_seen,
        "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs or []), "train_seconds": round(run.busy_s, 3),
        "pairs_per_second": round(run.pairs_seen / run.busy_s, 3) if run.busy_s else 0.0,
        "first_loss": run.history[0]["loss"], "final_loss": float(np.mean(run.running_loss[-10:])),
        "eval_accuracy": final_eval, "trainable_parameters_changed": len(before) - len(unchanged),
        "unchanged_parameters": unchanged, "trainable_parameters": len(before), "trainable_weights": trainable_weights,
        "world_size": ranks.world_size, "resumed_from": run.resumed_from, "config": asdict(cfg),
    }
    out_dir = Path(cfg.output_dir)
    if ranks.is_main:
        out_dir = rm.save(cfg.output_dir)  # save_pretrained writes CPU tensors whatever the device
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        (out_dir / "history.json").write_text(json.dumps(run.history))
        if cfg.plot:
            plot_curve(run.history, out_dir / "curve.png")
    distributed.barrier(ranks)
    return TrainResult(out_dir, metrics, run.history, device, rm)
