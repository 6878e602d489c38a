"""Mixed precision for training: the weights and the optimizer stay fp32 (master weights); the
forward passes run under autocast in bf16 or fp16, and fp16 scales the loss (GradScaler) so that
small gradients do not underflow.

On a CPU only fp32 and bf16 autocast exist: torch's CPU autocast has no fp16 path worth training in.
"""

from __future__ import annotations

import contextlib
from typing import Any

from trainers.exceptions import TrainerError
from trainers.scoring.devices import DTYPES

PRECISIONS = DTYPES  # fp32, bf16, fp16: the names scoring uses for its dtypes


def check_precision(precision: str, device: str) -> None:
    """A TrainerError saying the fix when ``precision`` cannot train on ``device``."""
    if precision not in PRECISIONS:
        raise TrainerError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise TrainerError("precision fp16 needs a CUDA GPU (it scales the loss with a CUDA GradScaler); on the "
                           "CPU use --precision bf16 (autocast) or fp32")
    if precision == "bf16" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise TrainerError(f"precision bf16 asked for, but {torch.cuda.get_device_name(device)} has no bf16 "
                               "support (it needs Ampere or later); use --precision fp16")


def autocast(precision: str, device: str) -> Any:
    """The context the forward passes run in: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(precision: str, device: str) -> Any:
    """A GradScaler, active for fp16 only (bf16 has fp32's exponent range and needs none)."""
    import torch

    return torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
