"""Parts of the training recipe that stand on their own: length-grouped batches, the micro-batches
of one optimizer step, freezing layers, dropout off, the progress display and the loss curve."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainers.exceptions import TrainerError


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, mega: int = 50) -> list[list[int]]:
    """Shuffle, then sort within mega-batches by length, so batches are homogeneous but order random."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches: list[list[int]] = []
    for start in range(0, len(idx), batch_size * mega):
        chunk = sorted(idx[start: start + batch_size * mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def step_batches(pending: list[list[int]], refill: Callable[[], list[list[int]]], tokens: Sequence[int],
                 grad_accum: int, tokens_per_step: int = 0) -> list[list[int]]:
    """The micro-batches of one optimizer step, popped from ``pending`` (refilled by ``refill`` when empty).

    Without a token budget, ``grad_accum`` of them. With one, as many as it takes for their real
    (unpadded) tokens, ``tokens[i]`` per pair, to reach ``tokens_per_step``: a step then carries a
    steady amount of text whether the pairs are short or long.
    """
    out: list[list[int]] = []
    got = 0
    while True:
        if not pending:
            pending.extend(refill())
        idx = pending.pop()
        out.append(idx)
        got += sum(tokens[i] for i in idx)
        if (got >= tokens_per_step) if tokens_per_step else len(out) == grad_accum:
            return out


def disable_dropout(model: Any) -> None:
    """Every dropout module at p=0 (the attention layers read their rate from these modules too)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def freeze_lower_layers(model: Any, n: int) -> None:
    """Freeze embeddings and the ``n`` lowest encoder/decoder layers."""
    if n <= 0:
        return
    base = getattr(model, model.base_model_prefix, model)
    embeddings = getattr(base, "embeddings", getattr(base, "embed_tokens", None))
    if embeddings is None:
        raise TrainerError(f"freeze_layers: cannot find the embeddings of {type(model).__name__}")
    for p in embeddings.parameters():
        p.requires_grad = False
    layers = None
    for attr in ("encoder.layer", "layers", "h"):
        obj = base
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
            layers = obj
            break
        except AttributeError:
            continue
    if layers is None:
        raise TrainerError(f"freeze_layers: cannot find the layer stack of {type(model).__name__}")
    for layer in list(layers)[:n]:
        for p in layer.parameters():
            p.requires_grad = False


class TrainingProgress:
    """A rich bar on a terminal; elsewhere (retrain job logs, kubectl logs) a plain line every tenth of the run.

    Both go to stderr: stdout carries the CLI's result (the output directory) for scripts.
    """

    LINES = 10

    def __init__(self, enabled: bool, total: int, done: int = 0) -> None:
        from rich.console import Console

        # every: a line each N steps (0 = none); done > 0 when a resumed run starts part-way.
        self.bar, self.every, self.total, self.done, self.start = None, 0, total, done, done
        self.started = time.perf_counter()
        if not enabled:
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            self.every = max(1, total // self.LINES)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=console)
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def update(self, info: str) -> None:
        self.done += 1
        if self.bar:
            self.bar.update(self.task, advance=1, info=info)
        elif self.every and (self.done % self.every == 0 or self.done == self.total):
            secs = time.perf_counter() - self.started
            left = secs / (self.done - self.start) * (self.total - self.done)
            print(f"training step {self.done}/{self.total} {info} ({secs:.0f} s, ~{left:.0f} s left)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def plot_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", color="tab:blue", alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("Bradley-Terry loss")
    evals = [h for h in history if "eval_accuracy" in h]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in evals], [h["eval_accuracy"] for h in evals], "o-", color="tab:orange", label="held-out accuracy")
        ax2.set_ylabel("held-out accuracy")
        ax2.set_ylim(0, 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
