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
import hashlib
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
from trainers.scoring.model import DEFAULT_MAX_LENGTH, RewardModel, default_base_path
from trainers.scoring.precision import PRECISIONS, autocast, check_precision, grad_scaler
from trainers.training import checkpoint, distributed
from trainers.training.data import read_pairs, split_holdout
from trainers.training.distributed import Ranks
from trainers.training.lora import ALL_LINEAR, AUTO_TARGETS, apply_lora, merge_lora
from trainers.training.recipe import (
    TrainingProgress,
    disable_dropout,
    freeze_lower_layers,
    length_grouped_batches,
    plot_curve,
    step_batches,
)

# Passes of 2 x 4 sequences: measured 1.16-1.34x faster than whole batches of 16 on a 2-core CPU
# when a pass held whole pairs; sorting sequences on their own gained 1.04-1.05x more (see _rewards).
# Parameter-name prefixes of the scalar head (BERT-style "classifier", decoder "score").
HEAD_PREFIXES = ("classifier", "score")
CPU_CHUNK_PAIRS = 4


def _help(text: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta: dict[str, Any] = {"help": text}
    if choices:
        meta["choices"] = choices  # the CLI offers these as click.Choice
    return field(metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Everything a training run needs; every field has help text (shown by `prefstream train --help`)."""

    train_files: list[str] = _help("Shard directories/files (*.avro) or JSONL files to train on.", default_factory=list)
    output_dir: str = _help("Where the trained model, metrics.json and curve.png are written.", default="trained-model")
    base_model: str = _help("Model directory to warm-start from; 'default' = packaged MiniLM-L6 with a new head.",
                            default="default")
    eval_files: list[str] = _help("Held-out files; empty = hold out eval_fraction of the training data.",
                                  default_factory=list)
    eval_fraction: float = _help("Share of the training data held out when no eval_files are given.", default=0.1)
    epochs: float = _help("Passes over the training data (ignored when max_steps > 0).", default=1.0)
    max_steps: int = _help("Optimizer steps to run; 0 = derive from epochs.", default=0)
    batch_size: int = _help("Pairs per micro-batch.", default=16)
    grad_accum: int = _help("Micro-batches per optimizer step (effective batch = batch_size * grad_accum).", default=1)
    tokens_per_step: int = _help("Token budget per optimizer step instead of --grad-accum: micro-batches of "
                                 "batch_size pairs are accumulated until their real (unpadded) tokens reach it, and "
                                 "each pair's loss is weighted so the gradient equals that of one batch of all of "
                                 "them. 0 = off.", default=0)
    chunk_pairs: int = _help("Forward passes inside a micro-batch take 2 x chunk_pairs sequences, sorted by length "
                             "(small passes pad less and are faster on CPU); their rewards join in one loss, so "
                             "bound memory with batch_size and grad_accum. 0 = the whole micro-batch in one pass; "
                             "-1 = auto (4 on CPU, the whole micro-batch on a GPU).", default=-1)
    learning_rate: float = _help("Peak AdamW learning rate.", default=3e-5)
    head_learning_rate: float = _help("Learning rate of the new scalar head (it starts from random).", default=1e-3)
    weight_decay: float = _help("AdamW weight decay.", default=0.01)
    warmup_ratio: float = _help("Share of steps with linear warm-up; then linear decay to 0.", default=0.1)
    max_length: int = _help("Tokens per (conversation, response); the conversation is cut from the left.",
                            default=DEFAULT_MAX_LENGTH)
    freeze_layers: int = _help("Freeze the embeddings and this many lowest transformer layers (CPU-friendly).",
                               default=0)
    freeze_embeddings: bool = _help("Freeze the token-embedding matrix only (half of MiniLM's weights): no gradient "
                                    "or AdamW state for it, so each CPU step is cheaper.", default=False)
    disable_dropout: bool = _help("Switch dropout off while training, as TRL's RewardTrainer does by default: chosen "
                                  "and rejected then go through the same network, and on a CPU the dropout masks "
                                  "cost ~15% of a step.", default=True)
    center_rewards_coefficient: float = _help("Weight of the reward-centering term; 0 disables it.", default=0.0)
    use_margin: bool = _help("Subtract each pair's 'margin' (when present) inside the sigmoid.", default=True)
    eval_every: int = _help("Evaluate on the held-out pairs every N optimizer steps; 0 = only at the end.",
                            default=50)
    patience: int = _help("Early stopping: stop after this many evaluations in a row without a better held-out "
                          "accuracy (ties broken by the lower held-out loss) and keep the weights of the best one; "
                          "0 = off (train every step, keep the last weights). Needs eval_every and held-out pairs.",
                          default=0)
    stop_after: int = _help("Stop after this many optimizer steps of the schedule max_steps (or epochs) plans, "
                            "keeping the schedule's learning rates: replays a run that stopped early. 0 = run the "
                            "whole schedule.", default=0)
    seed: int = _help("Seed for shuffling, the new head and dropout: equal seeds give equal runs.", default=0)
    threads: int = _help("torch CPU threads; 0 = torch's default.", default=0)
    device: str = _help("Where to train: 'cpu', 'cuda', 'cuda:N', or 'auto' (cuda when a GPU is visible). "
                        "Under torchrun give cuda or auto: each rank takes the GPU of its LOCAL_RANK.", default="auto")
    precision: str = _help("fp32, bf16 or fp16. bf16 and fp16 run the forward passes under autocast over fp32 "
                           "master weights (fp16 with a loss scaler, CUDA only); the saved model is fp32.",
                           default="fp32", choices=PRECISIONS)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass instead of keeping them "
                                         "(less memory; each layer's forward runs twice); same gradients.",
                                         default=False)
    lora_r: int = _help("Rank of LoRA adapters (needs the 'lora' extra, peft); 0 = train all weights. The head "
                        "trains in full; the adapters are merged into the saved model, which loads like any other. "
                        "LoRA is commonly trained at a higher --learning-rate (1e-4 to 2e-4).", default=0)
    lora_alpha: float = _help("LoRA scaling numerator: the adapter update is scaled by lora_alpha / lora_r.",
                              default=16.0)
    lora_dropout: float = _help("Dropout on the LoRA adapters' input (kept even with --disable-dropout).",
                                default=0.0)
    lora_targets: str = _help(f"Layers that get adapters: '{AUTO_TARGETS}' (peft's default for the architecture: "
                              f"the attention query and value projections), '{ALL_LINEAR}', or comma-separated "
                              "module names such as q_proj,k_proj,v_proj,o_proj.", default=AUTO_TARGETS)
    checkpoint_every: int = _help("Write a checkpoint to OUTPUT_DIR/checkpoints/step-N every N optimizer steps "
                                  "(safetensors and JSON, no pickle); 0 = none.", default=0)
    keep_checkpoints: int = _help("Checkpoints kept (the newest); 0 keeps all.", default=2)
    resume_from: str | None = _help("Continue a run from a checkpoint directory, or 'latest' (the newest under "
                                    "OUTPUT_DIR/checkpoints). Give the same data and options as the run.",
                                    default=None)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    plot: bool = _help("Write curve.png (loss and held-out accuracy).", default=True)
    progress: bool = _help("Show a progress bar.", default=True)

    def validate(self) -> None:
        if not self.train_files:
            raise TrainerError("no training data: give shard directories or JSONL files (--data)")
        self.check_options()

    def check_options(self) -> None:
        """Everything but the data files (a retrain job passes its pairs directly)."""
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise TrainerError(f"{name} must be positive, got {getattr(self, name)}")
        if self.chunk_pairs < -1:
            raise TrainerError(f"chunk_pairs must be -1 (auto), 0 (whole batch) or positive, got {self.chunk_pairs}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainerError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("tokens_per_step", "lora_r", "checkpoint_every", "keep_checkpoints", "patience", "stop_after"):
            if getattr(self, name) < 0:
                raise TrainerError(f"{name} must be 0 or positive, got {getattr(self, name)}")
        if self.tokens_per_step and self.grad_accum != 1:
            raise TrainerError(f"give --tokens-per-step ({self.tokens_per_step}) or --grad-accum ({self.grad_accum}), "
                               "not both: the token budget decides how many micro-batches a step takes")
        if self.precision not in PRECISIONS:
            raise TrainerError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.lora_dropout < 1:
            raise TrainerError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and self.lora_alpha <= 0:
            raise TrainerError(f"lora_alpha must be positive, got {self.lora_alpha}")


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    device: str = "cpu"  # where this process trained (cuda:LOCAL_RANK under torchrun on GPUs)
    reward_model: Any = None  # the trained model in memory, adapters merged (on every rank)


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


def _rewards(model: Any, formatter: Any, seqs: list[dict], per_pass: int, device: str) -> tuple[Any, Any]:
    """Rewards of a micro-batch's chosen (first half) and rejected (second half) sequences.

    The sequences are sorted by their own length and run in passes of ``per_pass`` (0: all at once),
    so a pass pads to its own longest member: chosen and rejected differ in length, and sorting them
    separately instead of keeping each pair's two in one pass cuts the padded tokens from 6.6% to 4.0%
    (bench pairs, passes of 8) and measured 1.04-1.05x the step rate side by side.
    The passes' graphs join in one loss and one backward.
    """
    import torch

    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]["input_ids"]))
    step = per_pass or len(order)
    outs = []
    for c0 in range(0, len(order), step):
        batch = formatter.pad([seqs[j] for j in order[c0: c0 + step]])
        outs.append(model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()}).logits[:, 0])
    rewards = torch.cat(outs)[torch.from_numpy(np.argsort(order)).to(device)]
    half = len(seqs) // 2
    return rewards[:half], rewards[half:]


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
class _Encoded:
    """The training pairs tokenised once: chosen and rejected sequences, margins, lengths and real tokens."""

    chosen: list[dict]
    rejected: list[dict]
    margins: np.ndarray
    lengths: list[int]  # the longer of each pair's two sequences (length grouping)
    tokens: list[int]  # each pair's two sequences together, unpadded (the token budget)

    def fingerprint(self) -> str:
        """sha256 of the token ids and margins: a resumed run must train on the same data."""
        h = hashlib.sha256(self.margins.tobytes())
        for seq in self.chosen + self.rejected:
            h.update(np.asarray(seq["input_ids"], dtype=np.int64).tobytes())
        return h.hexdigest()


def _encode(rm: Any, pairs: list[dict], use_margin: bool) -> _Encoded:
    conversations = [p["conversation"] for p in pairs]
    chosen = rm.formatter.encode(conversations, [p["chosen"] for p in pairs])
    rejected = rm.formatter.encode(conversations, [p["rejected"] for p in pairs])
    margins = np.array([float((p.get("extra") or {}).get("margin") or 0.0) if use_margin else 0.0 for p in pairs],
                       dtype=np.float32)
    lengths = [max(len(a["input_ids"]), len(b["input_ids"])) for a, b in zip(chosen, rejected, strict=True)]
    tokens = [len(a["input_ids"]) + len(b["input_ids"]) for a, b in zip(chosen, rejected, strict=True)]
    return _Encoded(chosen, rejected, margins, lengths, tokens)


def _pair_losses(reward_chosen: Any, reward_rejected: Any, margin: Any, center_coef: float) -> Any:
    """Each pair's loss: Bradley-Terry, plus the reward-centering term when its coefficient is set."""
    from torch.nn import functional as F

    loss = -F.logsigmoid(reward_chosen - reward_rejected - margin)
    if center_coef:
        loss = loss + center_coef * (reward_chosen + reward_rejected) ** 2
    return loss


@dataclass
class StepRunner:
    """The forward and backward passes of one optimizer step.

    Each pair's loss is weighted by 1 / (pairs in the step), so the gradient accumulated over the
    step's micro-batches is that of one batch of all its pairs, whatever their sizes. Across ranks
    each takes its share of the step's pairs and the weight grows by the number of ranks, because
    DistributedDataParallel averages the ranks' gradients.
    """

    model: Any  # what the passes run through: the model, or its DistributedDataParallel wrapper
    formatter: Any
    data: _Encoded
    cfg: TrainConfig
    device: str
    per_pass: int  # sequences per forward pass; 0 = a whole micro-batch
    ranks: Ranks = field(default_factory=Ranks)

    def _mine(self, micro_batches: list[list[int]]) -> list[list[int]]:
        if not self.ranks.distributed:
            return micro_batches
        flat = self.ranks.shard([i for b in micro_batches for i in b])  # length order kept: each rank pads little
        return [flat[k: k + self.cfg.batch_size] for k in range(0, len(flat), self.cfg.batch_size)]

    def backward(self, micro_batches: list[list[int]], scaler: Any) -> float:
        """Accumulate the step's gradients into .grad; returns the step's mean loss (over all ranks)."""
        import torch

        data, cfg = self.data, self.cfg
        weight = self.ranks.world_size / sum(len(b) for b in micro_batches)
        mine = self._mine(micro_batches)
        if not mine:
            # Fewer pairs in the step than ranks: this rank still joins the gradient all-reduce, with a
            # pass whose loss counts zero.
            mine, weight = [micro_batches[0][:1]], 0.0
        loss_sum = 0.0
        for k, idx in enumerate(mine):
            last = k == len(mine) - 1
            # Gradients are all-reduced once per step, in the last backward pass.
            sync = contextlib.nullcontext() if last or not self.ranks.distributed else self.model.no_sync()
            with sync:
                with autocast(cfg.precision, self.device):
                    reward_chosen, reward_rejected = _rewards(
                        self.model, self.formatter, [data.chosen[i] for i in idx] + [data.rejected[i] for i in idx],
                        self.per_pass, self.device)
                margin = torch.from_numpy(data.margins[idx]).to(self.device)
                loss = _pair_losses(reward_chosen.float(), reward_rejected.float(), margin,
                                    cfg.center_rewards_coefficient).sum() * weight
                scaler.scale(loss).backward()
            loss_sum += loss.item()
        return distributed.sum_across(loss_sum, self.device, self.ranks) / self.ranks.world_size


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
    best: _Best | None = None  # early stopping: the best evaluation so far and its weights


@dataclass
class _Best:
    """The best held-out evaluation of an early-stopped run: its step, score and trainable weights (on the CPU)."""

    step: int
    accuracy: float
    loss: float
    weights: dict[str, Any]
    since: int = 0  # evaluations since it without improvement

    def beaten_by(self, accuracy: float, loss: float) -> bool:
        return accuracy > self.accuracy or (accuracy == self.accuracy and loss < self.loss)

    @staticmethod
    def snapshot(model: Any) -> dict[str, Any]:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

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
            if "eval_accuracy" in row and _early_stop(run, model, cfg, row):
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


def _early_stop(run: _Run, model: Any, cfg: TrainConfig, row: dict[str, float]) -> bool:
    """Track the best evaluation (its weights kept on the CPU); True when ``patience`` evaluations in a row
    brought no better one. Rank 0 alone evaluates, so early stopping is for single-process runs."""
    if not cfg.patience:
        return False
    acc, loss = row["eval_accuracy"], row["eval_loss"]
    if run.best is None or run.best.beaten_by(acc, loss):
        run.best = _Best(run.steps, acc, loss, _Best.snapshot(model))
        return False
    run.best.since += 1
    return run.best.since >= cfg.patience


def _restore_best(run: _Run, model: Any) -> int | None:
    """Load the best evaluation's weights when they are not the last ones; the step they come from."""
    import torch

    if run.best is None:
        return None
    if run.best.step != run.steps:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in run.best.weights.items():
                params[name].copy_(value.to(params[name].device))
    return run.best.step


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
    best_step = _restore_best(run, model)
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
