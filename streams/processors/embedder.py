"""Sentence embeddings of prompts with the packaged MiniLM encoder (mean pooling, unit length).

Used by the labeler (taxonomy matching) and the retrieval index. Embeddings are cached per text
so a prompt is embedded once even when both processors ask for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

EMBED_MAX_LENGTH = 128
CACHE_SIZE = 4096
BATCH = 8


class Embedder:
    def __init__(self, max_length: int = EMBED_MAX_LENGTH) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from trainers.model import default_base_path, quiet_transformers

        quiet_transformers()
        path = default_base_path()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length
        self.dim = self.model.config.hidden_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _embed(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Length-sorted small batches, as the scorer does: little padding (see trainers.model.CPU_BATCH_SIZE).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for i in range(0, len(order), BATCH):
            idx = order[i: i + BATCH]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
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
