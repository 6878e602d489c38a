"""Where a model runs and in which precision: ``auto`` | ``cpu`` | ``cuda[:N]`` and ``auto`` | fp32 | bf16 | fp16.

- device ``auto``: CUDA when torch sees a GPU, else the CPU.
- dtype ``auto``: bf16 on a GPU that supports it (Ampere and later), else fp16 on a GPU; fp32 on the
  CPU, where bf16 and fp16 matmuls are slower than fp32 on most processors and the served path is
  ONNX Runtime anyway (the worker and ``prefstream eval`` refuse them there, see ``cpu_dtype_refusal``).
"""

from __future__ import annotations

from trainers.exceptions import DeviceError

DTYPES = ("fp32", "bf16", "fp16")
# Padded tokens per forward pass on an accelerator: 32 sequences of 2,048 tokens, 128 of 512. Enough
# rows for the matmuls of a 0.6B model to keep a large GPU busy, and an 8B model's activations at this
# size (a few GiB in bf16) fit beside its 16 GB of weights on a 40 GB card.
DEFAULT_TOKEN_BUDGET = 65536


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` for ``device``; DeviceError for CUDA without a GPU or an unknown name."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise DeviceError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                          "use device cpu or auto, or install a CUDA build of torch on a machine with a GPU")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """fp32, bf16 or fp16 for ``dtype`` on the resolved ``device`` (``auto`` picks as the module says)."""
    if dtype == "auto":
        if not device.startswith("cuda"):
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def cpu_dtype_refusal(dtype: str, device: str, name: str) -> str | None:
    """Why a service or command refuses ``dtype`` on ``device`` (None when it is fine); ``name`` is the option."""
    if device.startswith("cuda") or dtype in ("auto", "fp32"):
        return None
    return (f"{name}={dtype} on the CPU: bf16 and fp16 matmuls run slower than fp32 on most CPUs, and the CPU "
            f"path serves ONNX Runtime in fp32 or INT8; set {name} to auto or fp32, or run on a CUDA device")
