"""Sentence embeddings of prompts with the packaged MiniLM encoder (mean pooling, unit length).

Used by the labeler (taxonomy matching) and the retrieval index. Embeddings are cached per text
so a prompt is embedded once even when both processors ask for it.

The encoder runs on ONNX Runtime by default: it is exported in memory when the embedder starts
(about 2 s, no file written) and gives the same vectors as torch (cosine 1.000000 on 400 HH-RLHF
prompts) at 1.4-1.8x the speed for batches and 2.5x for a single prompt, which is the worker's
case at low rates (issue 4 note). Labeling is stream overhead on top of the model, so it must be
cheap. If the export fails, the torch encoder serves and the reason is logged.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from trainers.formatting import length_sorted_batches, pad_batch
from trainers.model import CPU_CALL_COST_TOKENS

log = logging.getLogger(__name__)

EMBED_MAX_LENGTH = 128
CACHE_SIZE = 4096
BATCH = 32  # prompts are short (median 13 tokens on HH-RLHF): 1.76 s vs 2.01 s at 8 for 400 prompts
BACKENDS = ("onnx", "torch")


def _torch_encoder(model: object) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import torch

    def run(enc: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()

    return run


def _onnx_encoder(model: object, tokenizer: object, threads: int | None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    from trainers.export import trace_to_onnx
    from trainers.model import OnnxBackend

    sample = tokenizer(["hello there", "a somewhat longer sentence for the sample"], padding=True, return_tensors="pt")
    names = list(sample.keys())
    buf = io.BytesIO()
    trace_to_onnx(model, dict(sample), "hidden", {0: "batch", 1: "sequence"}, lambda o: o.last_hidden_state, buf)
    # No spinning: its calls are small and sit between the scorer's, and idle threads spinning for
    # more work would take a core from the scorer's next batch.
    session = OnnxBackend(buf.getvalue(), threads, spin=False).session
    return lambda enc: session.run(None, {n: enc[n] for n in names})[0]


class Embedder:
    def __init__(self, max_length: int = EMBED_MAX_LENGTH, backend: str = "onnx", threads: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from trainers.model import default_base_path, quiet_transformers

        if backend not in BACKENDS:
            raise ValueError(f"embedder backend {backend!r} is not one of {', '.join(BACKENDS)}")
        quiet_transformers()
        path = default_base_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Eager attention: the SDPA path skips the mask for an unpadded trace sample and the ONNX
        # graph would keep that shortcut (see trainers.export).
        model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        self.max_length = max_length
        self.dim = model.config.hidden_size
        self.backend = backend
        self._encode = _torch_encoder(model)
        if backend == "onnx":
            try:
                self._encode = _onnx_encoder(model, self.tokenizer, threads)
            except Exception as exc:  # ExportError, or onnxruntime refusing the graph; torch still embeds correctly
                log.warning("embedder: ONNX export failed (%s); using torch", exc)
                self.backend = "torch"
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        items = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
        # Batches of similar token length, cut where padding would cost more than a call, as the
        # scorer's: HH prompts vary from 3 to 91 tokens, and the worker's micro-batches of 255 carried
        # 50% padding in character-sorted batches of 32 against 1.4% so (issue 4 note).
        lengths = [len(x["input_ids"]) for x in items]
        for idx in length_sorted_batches(lengths, BATCH, CPU_CALL_COST_TOKENS):
            batch = pad_batch([items[j] for j in idx], self.tokenizer.pad_token_id or 0)
            hidden = self._encode(batch)
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out[idx] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for t, v in zip(missing, self._embed(missing), strict=True):
                self._cache[t] = v
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return np.stack([self._cache[t] if t in self._cache else self._embed([t])[0] for t in texts]) if texts else \
            np.zeros((0, self.dim), dtype=np.float32)
