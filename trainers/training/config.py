"""The training run's configuration (`prefstream train --help` shows every field's help) and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.exceptions import TrainerError
from trainers.scoring.model import DEFAULT_MAX_LENGTH
from trainers.scoring.precision import PRECISIONS
from trainers.training.lora import ALL_LINEAR, AUTO_TARGETS


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


