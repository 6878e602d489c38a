"""One optimizer step's forward and backward passes: the pairs tokenised once, rewards in length-sorted
passes, the Bradley-Terry loss per pair, gradients weighted so accumulation equals one large batch."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainers.scoring.precision import autocast
from trainers.training import distributed
from trainers.training.config import TrainConfig
from trainers.training.distributed import Ranks

# Parameter-name prefixes of the scalar head (BERT-style "classifier", decoder "score").
HEAD_PREFIXES = ("classifier", "score")


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


