"""ONNX export with dynamic batch and sequence axes, dynamic INT8 quantisation, and an agreement check.

The check scores a validation set with torch and with each exported file and compares decisions
(which response wins). Below the threshold the export fails loudly and leaves no ONNX file behind.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trainers.exceptions import ExportError
from trainers.scoring.model import ONNX_FP32, ONNX_INT8, OnnxBackend, RewardModel

MIN_AGREEMENT = 0.995
OPSET = 17


@dataclass
class ExportReport:
    fp32_path: Path
    int8_path: Path | None
    agreement_fp32: float
    agreement_int8: float | None
    max_abs_diff_fp32: float
    validation_pairs: int


def trace_to_onnx(model: Any, sample: dict[str, Any], output: str, output_axes: dict[int, str],
                  pick: Callable[[Any], Any], out: Path | BinaryIO) -> None:
    """Trace ``pick(model(**inputs))`` into ONNX at ``out`` (a path or a buffer).

    Every input gets dynamic batch and sequence axes; ``sample`` holds torch tensors in input order.
    Also used by the stream's embedder, so the two exports cannot drift apart.
    """
    import torch

    names = list(sample)

    class _Wrapper(torch.nn.Module):
        # Positional inputs in a fixed order; returns the one tensor ``pick`` selects.
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return pick(self.inner(**dict(zip(names, args, strict=True))))

    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {output: output_axes}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            target = out if isinstance(out, io.IOBase) else str(out)
            # .eval() on the wrapper: the export puts a module back in the mode it found it in, and a new
            # module is in training mode, which would leave the wrapped model with dropout switched on.
            torch.onnx.export(_Wrapper(model).eval(), tuple(sample[n] for n in names),
                              target,  # type: ignore[arg-type]  # torch types f as a path; buffers work too
                              input_names=names,
                              output_names=[output], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        except Exception as exc:  # torch raises many types here; all mean the same to the user
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {exc}") from exc


def _export_onnx(rm: RewardModel, out: Path | BinaryIO, model: Any = None) -> None:
    """Trace ``model`` (default: reload ``rm``'s weights with eager attention) into ONNX at ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    # Eager attention: the SDPA path skips the mask when the traced sample has no padding, and
    # that decision would be frozen into the graph. The sample is padded for the same reason.
    if model is None:
        model = AutoModelForSequenceClassification.from_pretrained(rm.path, num_labels=1, attn_implementation="eager")
    model = model.eval()
    # The graph bakes the pad id in (the classifier compares input_ids with it), so it must be the
    # one the formatter pads with, whatever the file on disk says.
    model.config.pad_token_id = rm.formatter.pad_id
    sample = rm.formatter.pad(rm.formatter.encode(
        [[{"role": "user", "content": "hello there, how are you today?"}]] * 2,
        ["hi", "hello, I am fine and I hope you are well too"]))
    trace_to_onnx(model, {n: torch.from_numpy(v) for n, v in sample.items()}, "logits", {0: "batch"},
                  lambda o: o.logits, out)


def onnx_twin(rm: RewardModel, threads: int | None = None, probe: list[dict] | None = None) -> RewardModel:
    """The same torch model served by ONNX Runtime, exported in memory (nothing written to disk).

    For a model that has no ONNX file, such as the untrained bootstrap default, whose head exists
    only in memory. ``rm`` must hold its torch model loaded with eager attention (see _export_onnx).
    Refused with ExportError when the twin's rewards differ from torch's on the probe pairs.
    """
    if rm.torch_model is None or rm.torch_model.config._attn_implementation != "eager":
        raise ExportError("onnx_twin needs a torch model loaded with attn_implementation='eager'")
    buf = io.BytesIO()
    _export_onnx(rm, buf, rm.torch_model)
    twin = RewardModel(rm.tokenizer, OnnxBackend(buf.getvalue(), threads), rm.input_format, rm.max_length,
                       rm.batch_size, None, rm.path, rm.formatter.use_token_type_ids, rm.call_cost,
                       rm.formatter.pad_id, temperature=rm.temperature)
    probe = probe or [{"conversation": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4", "rejected": "5"},
                      {"conversation": [{"role": "user", "content": "Say hello " * 40}], "chosen": "hello",
                       "rejected": "no " * 30}]
    want, got = np.stack(rm.score_pairs(probe)), np.stack(twin.score_pairs(probe))
    if not np.allclose(want, got, atol=1e-3):
        raise ExportError(f"the in-memory ONNX export differs from torch by {np.abs(want - got).max():.4f}")
    return twin


def _decisions(rc: np.ndarray, rr: np.ndarray) -> np.ndarray:
    return np.sign(rc - rr)


def _quantize(rm: RewardModel, fp32: Path, int8: Path, calibration_pairs: list[dict]) -> None:
    """Dynamic INT8 of ``fp32`` at ``int8``, SmoothQuant-scaled on the calibration pairs' activations first.

    ``rm`` is the checked model serving ``fp32``; its tokenizer and batching feed the calibration, and
    its backend is replaced by the calibration probe (it is not used afterwards).
    """
    import onnx

    from trainers.export import smoothquant

    def calibrate(backend: Callable[[dict[str, np.ndarray]], np.ndarray]) -> None:
        rm.backend = backend
        rm.score_pairs(calibration_pairs)

    smoothquant.quantize(onnx.load(str(fp32)), calibrate, int8)


def export(model_dir: str | Path, validation_pairs: list[dict], quantize: bool = True,
           min_agreement: float = MIN_AGREEMENT) -> ExportReport:
    """Write model.onnx (and model.int8.onnx) into ``model_dir``, checked against torch.

    The INT8 file is calibrated (SmoothQuant scales) on the validation pairs before they check it.
    """
    model_dir = Path(model_dir)
    if not validation_pairs:
        raise ExportError("the agreement check needs validation pairs; give --data")
    rm = RewardModel.load(model_dir)
    fp32, int8 = model_dir / ONNX_FP32, model_dir / ONNX_INT8
    _export_onnx(rm, fp32)
    ref_c, ref_r = rm.score_pairs(validation_pairs)
    ref = _decisions(ref_c, ref_r)

    def remove() -> None:
        for f in (fp32, int8):
            f.unlink(missing_ok=True)

    def check(path: Path) -> tuple[float, float, RewardModel]:
        onnx_rm = RewardModel.load(model_dir, backend="onnx", onnx_file=path.name)
        c, r = onnx_rm.score_pairs(validation_pairs)
        agree = float(np.mean(_decisions(c, r) == ref))
        if agree < min_agreement:
            remove()
            raise ExportError(
                f"{path.name} agrees with torch on only {agree:.2%} of {len(validation_pairs)} validation decisions "
                f"(need {min_agreement:.1%}); the export was removed. Try without INT8 (--no-quantize)."
            )
        return agree, float(max(np.abs(c - ref_c).max(), np.abs(r - ref_r).max())), onnx_rm

    agree_fp32, diff, fp32_rm = check(fp32)
    agree_int8 = None
    if quantize:
        try:
            _quantize(fp32_rm, fp32, int8, validation_pairs)
        except Exception as exc:  # onnx / onnxruntime raise many types here; all mean the export failed
            remove()
            raise ExportError(f"INT8 quantisation of {fp32} failed: {exc}; export without INT8 (--no-quantize)") from exc
        agree_int8, _, _ = check(int8)
    return ExportReport(fp32, int8 if quantize else None, agree_fp32, agree_int8, diff, len(validation_pairs))
