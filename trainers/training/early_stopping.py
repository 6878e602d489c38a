"""Early stopping: the best held-out evaluation of a run and its trainable weights, restored at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainers.training.config import TrainConfig


@dataclass
class Best:
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


def early_stop(run: Any, model: Any, cfg: TrainConfig, row: dict[str, float]) -> bool:
    """Track the best evaluation (its weights kept on the CPU); True when ``patience`` evaluations in a row
    brought no better one. Rank 0 alone evaluates, so early stopping is for single-process runs."""
    if not cfg.patience:
        return False
    acc, loss = row["eval_accuracy"], row["eval_loss"]
    if run.best is None or run.best.beaten_by(acc, loss):
        run.best = Best(run.steps, acc, loss, Best.snapshot(model))
        return False
    run.best.since += 1
    return run.best.since >= cfg.patience


def restore_best(run: Any, model: Any) -> int | None:
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


