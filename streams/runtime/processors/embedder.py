"""Sentence embeddings of prompts with the packaged MiniLM encoder (mean pooling, unit length).

Used by the labeler (taxonomy matching) and the retrieval index. Embeddings are cached per text
so a prompt is embedded once even when both processors ask for it.

The encoder runs on ONNX Runtime by default: it is exported in memory when the embedder starts
(about 2 s, no file written) and gives the same vectors as torch (cosine 1.000000 on 400 HH-RLHF
prompts) at 1.4-1.8x the speed for batches and 2.5x for a single prompt, which is the worker's
case at low rates. If the export fails, the torch encoder serves and the reason is
logged.

Labeling is stream overhead on top of the model, so it must be cheap: with the MiniLM reward model
the fp32 encoder alone took 5.5-7% of the worker's time. ``precision="int8"`` (the default) quantises
the exported graph at start (2.3 s more: SmoothQuant scales calibrated on the packaged taxonomy
texts, then dynamic INT8). Measured against fp32 (on 2,257 HH-RLHF prompts): 2.0x faster
(1,000 HH-RLHF prompts in 255-prompt micro-batches, 1.10-1.12 s against 2.20-2.25 s); on 2,257
prompts median cosine 0.990, 90.2% of task categories the same, 98.4% where fp32's best category
leads the next by at least 0.02 (72% of prompts; the changes are near-ties), 87.7% of the top-8
neighbours the same. INT8 activation scales are per batch, so a vector moves a little with its
batch. ``precision="fp32"`` gives fp32's labels exactly.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schemas.pairs import prompt_text
from streams.exceptions import ConfigError
from streams.runtime.processors.stage import Item, Stage
from trainers.scoring.formatting import length_sorted_batches, pad_batch
from trainers.scoring.model import CPU_CALL_COST_TOKENS

log = logging.getLogger(__name__)

EMBED_MAX_LENGTH = 128
CACHE_SIZE = 4096
# Texts are cut to this many characters before tokenising: the encoder reads EMBED_MAX_LENGTH tokens
# anyway, and a 1 MiB prompt would otherwise be tokenised whole and kept whole as a cache key
# (4,096 such keys would hold 4 GiB).
MAX_EMBED_CHARS = 64 * EMBED_MAX_LENGTH
BATCH = 32  # prompts are short (median 13 tokens on HH-RLHF): 1.76 s vs 2.01 s at 8 for 400 prompts
BACKENDS = ("onnx", "torch")
PRECISIONS = ("int8", "fp32")


def _torch_encoder(model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import torch

    def run(enc: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()

    return run


def _export(model: Any, tokenizer: Any) -> tuple[bytes, list[str]]:
    """The encoder as fp32 ONNX graph bytes (exported in memory) and its input names."""
    from trainers.export.onnx import trace_to_onnx

    sample = tokenizer(["hello there", "a somewhat longer sentence for the sample"], padding=True, return_tensors="pt")
    buf = io.BytesIO()
    trace_to_onnx(model, dict(sample), "hidden", {0: "batch", 1: "sequence"}, lambda o: o.last_hidden_state, buf)
    return buf.getvalue(), list(sample.keys())


def _onnx_encoder(graph: bytes, names: list[str], threads: int | None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    from trainers.scoring.model import OnnxBackend

    # No spinning: its calls are small and sit between the scorer's, and idle threads spinning for
    # more work would take a core from the scorer's next batch.
    session = OnnxBackend(graph, threads, spin=False).session
    return lambda enc: session.run(None, {n: enc[n] for n in names})[0]


def _int8(fp32: bytes, calibrate: Callable[[Callable[[dict[str, np.ndarray]], object]], None]) -> bytes:
    import onnx

    from trainers.export import smoothquant

    with tempfile.TemporaryDirectory(prefix="prefstream-embedder-") as tmp:  # quantize_dynamic works on files
        out = Path(tmp) / "embedder.int8.onnx"
        smoothquant.quantize(onnx.load_from_string(fp32), calibrate, out)
        return out.read_bytes()


def calibration_texts() -> list[str]:
    """Prompt-like texts shipped with the package: each taxonomy category's description and examples."""
    from streams.runtime.processors.labeler import load_taxonomy

    return [t for c in load_taxonomy() for t in (c.description, *c.examples)]


class Embedder:
    """``precision`` applies to the ONNX backend (torch embeds in fp32); see the module docstring."""

    def __init__(self, max_length: int = EMBED_MAX_LENGTH, backend: str = "onnx", threads: int | None = None,
                 precision: str = "int8") -> None:
        from transformers import AutoModel, AutoTokenizer

        from trainers.scoring.model import default_base_path, quiet_transformers

        if backend not in BACKENDS:
            raise ConfigError(f"embedder backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"embedder precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        quiet_transformers()
        path = default_base_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Eager attention: the SDPA path skips the mask for an unpadded trace sample and the ONNX
        # graph would keep that shortcut (see trainers.export.onnx).
        model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        self.max_length = max_length
        self.dim = model.config.hidden_size
        self.backend, self.precision = backend, "fp32"
        self._encode = _torch_encoder(model)
        if backend == "onnx":
            self._encode = self._onnx(model, threads, precision)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _onnx(self, model: object, threads: int | None, precision: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """The ONNX encoder, INT8 if asked and possible; else fp32; else (export refused) torch's."""
        try:
            graph, names = _export(model, self.tokenizer)
            if precision == "int8":
                def calibrate(probe: Callable[[dict[str, np.ndarray]], object]) -> None:
                    for _, batch in self._batches(calibration_texts()):
                        probe(batch)
                try:
                    encode = _onnx_encoder(_int8(graph, calibrate), names, threads)
                    self.precision = "int8"
                    return encode
                except Exception as exc:  # quantisation is an optimisation: fp32 embeds correctly
                    log.warning("embedder: INT8 quantisation failed (%s); embedding in fp32", exc)
            return _onnx_encoder(graph, names, threads)
        except Exception as exc:  # ExportError, or onnxruntime refusing the graph; torch still embeds correctly
            log.warning("embedder: ONNX export failed (%s); using torch", exc)
            self.backend = "torch"
            return _torch_encoder(model)

    def _batches(self, texts: list[str]) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
        """(indices, padded batch) over ``texts``, tokenised once.

        Batches of similar token length, cut where padding would cost more than a call, as the
        scorer's: HH prompts vary from 3 to 91 tokens, and the worker's micro-batches of 255 carried
        50% padding in character-sorted batches of 32 against 1.4% so.
        """
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        items = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
        lengths = [len(x["input_ids"]) for x in items]
        for idx in length_sorted_batches(lengths, BATCH, CPU_CALL_COST_TOKENS):
            yield idx, pad_batch([items[j] for j in idx], self.tokenizer.pad_token_id or 0)

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx, batch in self._batches(texts):
            hidden = self._encode(batch)
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out[idx] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = [t[:MAX_EMBED_CHARS] for t in texts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for t, v in zip(missing, self._embed(missing), strict=True):
                self._cache[t] = v
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return np.stack([self._cache[t] if t in self._cache else self._embed([t])[0] for t in texts]) if texts else \
            np.zeros((0, self.dim), dtype=np.float32)


class EmbedStage(Stage[np.ndarray]):
    """The last user turn's unit embedding (``Item.vec``), for the retrieval index and the review tasks'
    similar pairs. Its time counts under the labeler's timer: the two share the encoder."""

    name, timer = "embed", "label"
    second_look = True

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def run(self, items: list[Item]) -> list[np.ndarray]:
        return list(self.embedder.embed([prompt_text(i.pair) for i in items]))

    def keep(self, item: Item, result: np.ndarray) -> None:
        item.vec = result
