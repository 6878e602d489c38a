"""LoRA adapters through ``peft`` (the optional ``lora`` extra), merged back before saving.

The adapters go into the model in place: the same module object then runs with them, so scoring
during training needs no second copy. The scalar head is new or small and is trained in full
(peft's ``modules_to_save``). At save time ``merge_and_unload`` folds ``B @ A * alpha / r`` into
each target weight and puts the trained head back under its own name, so the published version is
a plain safetensors model that the loader and the ONNX export read unchanged.
"""

from __future__ import annotations

from typing import Any

from trainers.exceptions import TrainerError

# Names of the scalar head in sequence-classification models (BERT-style "classifier", decoder "score").
HEAD_NAMES = ("classifier", "score")
# What --lora-targets accepts besides a list of module names.
AUTO_TARGETS = "auto"  # peft's per-architecture default (the attention query and value projections)
ALL_LINEAR = "all-linear"  # every linear layer but the head


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise TrainerError("LoRA (--lora-r > 0) needs the peft package: pip install 'prefstream[lora]' "
                           "(or pip install 'peft>=0.11'), or train without it (--lora-r 0)") from exc
    return peft


def target_modules(spec: str) -> Any:
    """peft's target_modules for ``spec``: None (auto), 'all-linear', or a list of module names."""
    spec = spec.strip()
    if spec in ("", AUTO_TARGETS):
        return None
    if spec == ALL_LINEAR:
        return ALL_LINEAR
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise TrainerError(f"lora_targets {spec!r} names no modules; give auto, all-linear or e.g. q_proj,v_proj")
    return names


def apply_lora(model: Any, r: int, alpha: float, dropout: float, targets: str) -> Any:
    """Wrap ``model`` with LoRA adapters of rank ``r``; returns the PeftModel (``model`` now holds the adapters)."""
    peft = _peft()
    heads = [n for n in HEAD_NAMES if hasattr(model, n)]
    if not heads:
        raise TrainerError(f"LoRA: {type(model).__name__} has no scalar head named {' or '.join(HEAD_NAMES)}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(targets),
                             modules_to_save=heads, task_type=peft.TaskType.SEQ_CLS)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise TrainerError(f"LoRA cannot wrap {type(model).__name__} with targets {targets!r}: {exc}. Name the "
                           "linear layers with --lora-targets (e.g. q_proj,v_proj) or use all-linear") from exc
    if not any("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad):
        raise TrainerError(f"LoRA targets {targets!r} matched no layer of {type(model).__name__}; "
                           "use auto, all-linear or names of its linear layers")
    return wrapped


def merge_lora(wrapped: Any) -> Any:
    """The plain model with the adapters folded into its weights (the head back under its own name)."""
    return wrapped.merge_and_unload()
