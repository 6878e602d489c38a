"""Nearest-neighbour index over prompt embeddings of the pairs seen so far (exact cosine search).

Exact search on a contiguous float32 matrix is one matrix-vector product: at 100k x 384 that is
~38 MFLOP per query, a few milliseconds on one core, with recall 1.0 by construction. An
approximate index would only pay off far beyond the sizes a worker keeps in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_CAPACITY = 200_000


@dataclass
class Neighbour:
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    label_source: str
    similarity: float


class NeighbourIndex:
    def __init__(self, dim: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.dim, self.capacity = dim, capacity
        self.vectors = np.zeros((min(capacity, 1024), dim), dtype=np.float32)
        self.meta: list[tuple[str, str, str, str, str]] = []
        self.ids: dict[str, int] = {}
        self.size = 0
        self._next = 0  # ring position once full: the oldest pairs are forgotten first

    def add(self, vectors: np.ndarray, metas: list[tuple[str, str, str, str, str]]) -> None:
        for vec, meta in zip(vectors, metas, strict=True):
            if meta[0] in self.ids:
                continue
            if self.size < self.capacity:
                if self.size == len(self.vectors):
                    grown = np.zeros((min(self.capacity, len(self.vectors) * 2), self.dim), dtype=np.float32)
                    grown[: self.size] = self.vectors[: self.size]
                    self.vectors = grown
                slot = self.size
                self.size += 1
                self.meta.append(meta)
            else:
                slot = self._next
                self._next = (self._next + 1) % self.capacity
                del self.ids[self.meta[slot][0]]
                self.meta[slot] = meta
            self.vectors[slot] = vec
            self.ids[meta[0]] = slot

    def search(self, query: np.ndarray, k: int, exclude: str | None = None) -> list[Neighbour]:
        if k <= 0 or self.size == 0:
            return []
        sims = self.vectors[: self.size] @ query
        want = min(k + 1, self.size)
        top = np.argpartition(-sims, want - 1)[:want]
        top = top[np.argsort(-sims[top])]
        out = []
        for i in top:
            m = self.meta[i]
            if m[0] == exclude:
                continue
            out.append(Neighbour(m[0], m[1], m[2], m[3], m[4], float(sims[i])))
            if len(out) == k:
                break
        return out
