"""Data-parallel training across processes started by ``torchrun`` (WORLD_SIZE > 1).

Every rank reads the same data and draws the same batches (same seed); each optimizer step's pairs
are then split between the ranks, and DistributedDataParallel averages the gradients. Rank 0 alone
evaluates, saves and publishes; it hands its result to the other ranks with ``broadcast_json`` so
that all ranks take the same path through a job (no pickle: the result travels as JSON bytes).
"""

from __future__ import annotations

import atexit
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from trainers.exceptions import TrainerError

# Ranks wait at a collective while rank 0 evaluates, exports ONNX and publishes: allow for that.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share: every world_size-th item from its rank on (all items when not distributed)."""
        return items[self.rank::self.world_size]


def ranks() -> Ranks:
    """From torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise TrainerError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them): {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise TrainerError(f"rank {rank} of WORLD_SIZE {world} is impossible; launch with torchrun --nproc_per_node=N")
    return Ranks(rank, world, local)


def rank_device(device: str, r: Ranks) -> str:
    """The device of this rank: with several ranks on CUDA, each takes the GPU of its LOCAL_RANK."""
    if not r.distributed or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise TrainerError(f"device {device!r} under torchrun: give --device cuda (or auto); each rank then uses "
                           "the GPU of its LOCAL_RANK")
    import torch

    if r.local_rank >= torch.cuda.device_count():
        raise TrainerError(f"LOCAL_RANK {r.local_rank} but torch sees {torch.cuda.device_count()} GPU(s); "
                           "set --nproc_per_node to the number of GPUs")
    torch.cuda.set_device(r.local_rank)
    return f"cuda:{r.local_rank}"


def init(device: str, r: Ranks) -> None:
    """Join the process group (nccl on CUDA, gloo on the CPU) once per process."""
    if not r.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    # A job may train twice in one process (Stage 1 with a current model in place): the group lives
    # until the process ends, and is then left cleanly (NCCL warns about a group never destroyed).
    atexit.register(dist.destroy_process_group)


def wrap(model: Any, device: str, r: Ranks) -> Any:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself."""
    if not r.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return DistributedDataParallel(model, device_ids=ids)


def sum_across(value: float, device: str, r: Ranks) -> float:
    """``value`` summed over all ranks."""
    if not r.distributed:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_json(obj: Any, device: str, r: Ranks) -> Any:
    """Rank 0's ``obj`` (JSON-serialisable) on every rank."""
    if not r.distributed:
        return obj
    import torch
    import torch.distributed as dist

    data = json.dumps(obj).encode() if r.is_main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if r.is_main
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, 0)
    return json.loads(buf.cpu().numpy().tobytes().decode()) if not r.is_main else obj


def barrier(r: Ranks) -> None:
    if r.distributed:
        import torch.distributed as dist

        dist.barrier()
