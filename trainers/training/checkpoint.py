"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint directory (``<output_dir>/checkpoints/step-N``) holds

- ``trainable.safetensors``: the parameters that train (all of them, or the LoRA adapters and the
  head); the frozen rest comes again from the base model, which the state records and resume checks;
- ``optimizer.safetensors`` and the optimizer's param groups in the JSON;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states;
- ``trainer_state.json``: step, counters, history, the learning-rate schedule, the loss scaler, the
  batch order still to come this epoch and the Python and NumPy generator states.

It is written under a temporary name and renamed when complete, so an interrupted save never leaves
a half checkpoint that resume would read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np

from trainers.exceptions import TrainerError

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT = 1
PREFIX = "step-"
LATEST = "latest"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and _step_of(p) >= 0 and (p / STATE_FILE).exists()]
    return sorted(found, key=_step_of)


def resolve(resume_from: str, output_dir: str) -> Path:
    """The checkpoint directory ``resume_from`` names: a directory, or ``latest`` under output_dir."""
    if resume_from == LATEST:
        found = list_checkpoints(checkpoints_root(output_dir))
        if not found:
            raise TrainerError(f"--resume-from latest: no checkpoint under {checkpoints_root(output_dir)}; "
                               "train with --checkpoint-every N to write them")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        latest = list_checkpoints(checkpoints_root(path)) or list_checkpoints(path)
        if latest:  # an output directory or its checkpoints/ folder: take its newest checkpoint
            return latest[-1]
        raise TrainerError(f"--resume-from {path}: not a checkpoint directory (no {STATE_FILE}); give a "
                           f"{checkpoints_root('OUTPUT_DIR')}/{PREFIX}N directory or 'latest'")
    return path


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    # numpy's stub types the default call as the dict form, but the legacy default returns this tuple.
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, pos, has_gauss, cached = state
    return {"python": _py_state(random.getstate()),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}, tensors


def _py_state(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def py_state_from(saved: list) -> tuple:
    return saved[0], tuple(saved[1]), saved[2]


def save(output_dir: str | os.PathLike, step: int, *, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
         state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step``; keep the newest ``keep`` checkpoints (0 keeps all)."""
    from safetensors.torch import save_file

    root = checkpoints_root(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".{PREFIX}{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()}, str(tmp / TRAINABLE_FILE))
    opt = optimizer.state_dict()
    save_file({f"{i}.{k}": v.contiguous().cpu() for i, s in opt["state"].items() for k, v in s.items()},
              str(tmp / OPTIMIZER_FILE))
    rng_json, rng_tensors = _rng_state()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE))
    doc = {"format": FORMAT, "step": step, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
           "scaler": scaler.state_dict(), "rng": rng_json, "trainable": sorted(_trainable(model)), **state}
    (tmp / STATE_FILE).write_text(json.dumps(doc))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, *, model: Any, optimizer: Any, scheduler: Any, scaler: Any, device: str) -> dict[str, Any]:
    """Restore model, optimizer, schedule, loss scaler and generators from ``path``; returns the JSON state."""
    import torch
    from safetensors.torch import load_file

    doc = json.loads((path / STATE_FILE).read_text())
    if doc.get("format") != FORMAT:
        raise TrainerError(f"{path}: checkpoint format {doc.get('format')!r}, this version reads {FORMAT}")
    params = _trainable(model)
    if sorted(params) != doc["trainable"]:
        missing = sorted(set(doc["trainable"]) ^ set(params))[:3]
        raise TrainerError(f"{path} was saved with other trainable parameters (e.g. {missing}); resume with the "
                           "same --base-model, --lora-*, --freeze-* and --center-rewards-coefficient as the run")
    weights = load_file(str(path / TRAINABLE_FILE))
    with torch.no_grad():
        for name, param in params.items():
            if weights[name].shape != param.shape:
                raise TrainerError(f"{path}: {name} has shape {tuple(weights[name].shape)}, the model "
                                   f"{tuple(param.shape)}; resume with the same base model")
            param.copy_(weights[name])
    tensors = load_file(str(path / OPTIMIZER_FILE), device="cpu")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [g | {"betas": tuple(g["betas"])} if "betas" in g else g for g in doc["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})  # moves the state to the params' device
    scheduler.load_state_dict(doc["scheduler"])
    if doc["scaler"]:
        scaler.load_state_dict(doc["scaler"])
    rng = load_file(str(path / RNG_FILE))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and device.startswith("cuda"):
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    random.setstate(py_state_from(doc["rng"]["python"]))
    kind, keys, pos, has_gauss, cached = doc["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return doc
