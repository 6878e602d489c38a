"""Nearest-neighbour index over prompt embeddings of the pairs seen so far (cosine similarity).

Below ``EXACT_LIMIT`` vectors a search is one exact matrix-vector product. Above it the index
becomes an inverted file (IVF): k-means centroids trained on a sample, each vector filed under its
nearest centroid, and a query scans only the ``nprobe`` closest lists. At 100k x 384 that is ~16x
less work than exact search, with recall@8 measured against exact search in `make bench`.
Centroids are retrained when the index has doubled since the last training, so new topics get
lists of their own.
"""

from __future__ import annotations

import numpy as np

from schemas.pairs import clip
from schemas.records import SimilarPair

DEFAULT_CAPACITY = 200_000
EXACT_LIMIT = 20_000
N_LISTS = 256
N_PROBE = 24
KMEANS_SAMPLE = 20_000
KMEANS_ITERS = 6
# Neighbours are context for a reviewer, not the pairs themselves: each text is kept to its start.
# Bounds the index's memory (200,000 pairs of up to 4 MiB each would not fit any worker) and the
# size of a review task's similar list (8 neighbours of whole pairs could pass max.message.bytes).
NEIGHBOUR_TEXT_CHARS = 4000


class NeighbourIndex:
    def __init__(self, dim: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.dim, self.capacity = dim, capacity
        self.vectors = np.zeros((min(capacity, 1024), dim), dtype=np.float32)
        self.meta: list[tuple[str, str, str, str, str]] = []
        self.ids: dict[str, int] = {}
        self.size = 0
        self._next = 0  # ring position once full: the oldest pairs are forgotten first
        self.centroids: np.ndarray | None = None
        self.assign = np.zeros(0, dtype=np.int32)  # list (centroid) of each slot
        self._lists: list[np.ndarray] | None = None
        self._list_vecs: list[np.ndarray] = []
        self._built_size = 0
        self._changes = 0  # vectors added or replaced since the lists were built
        self._trained_at = 0

    # ------------------------------------------------------------------ IVF
    def _train(self) -> None:
        rng = np.random.default_rng(0)
        data = self.vectors[: self.size]
        sample = data[rng.choice(self.size, min(KMEANS_SAMPLE, self.size), replace=False)]
        cent = sample[rng.choice(len(sample), N_LISTS, replace=False)].copy()
        for _ in range(KMEANS_ITERS):
            lab = (sample @ cent.T).argmax(1)
            for c in range(N_LISTS):
                members = sample[lab == c]
                if len(members):
                    v = members.mean(0)
                    cent[c] = v / (np.linalg.norm(v) or 1.0)
        self.centroids = cent
        self.assign = np.concatenate([(data[i: i + 8192] @ cent.T).argmax(1) for i in range(0, self.size, 8192)]).astype(np.int32)
        self._lists = None
        self._inverted()
        self._trained_at = self.size

    def _inverted(self) -> list[np.ndarray]:
        # Contiguous copies per list make a probe a few small GEMVs instead of a large gather.
        # Vectors added since the build are scanned exactly (the tail) until they reach 10%.
        if self._lists is None or self._changes > max(1000, self.size // 10):
            order = np.argsort(self.assign[: self.size], kind="stable")
            bounds = np.searchsorted(self.assign[: self.size][order], np.arange(N_LISTS + 1))
            self._lists = [order[bounds[c]: bounds[c + 1]] for c in range(N_LISTS)]
            self._list_vecs = [self.vectors[idx] for idx in self._lists]
            self._built_size, self._changes = self.size, 0
        return self._lists

    def _file(self, slot: int, vec: np.ndarray) -> None:
        if self.centroids is None:
            return
        if slot >= len(self.assign):
            grown = np.zeros(max(len(self.assign) * 2, slot + 1024), dtype=np.int32)
            grown[: len(self.assign)] = self.assign
            self.assign = grown
        self.assign[slot] = int((self.centroids @ vec).argmax())
        self._changes += 1

    def add(self, vectors: np.ndarray, metas: list[tuple[str, str, str, str, str]]) -> None:
        for vec, meta in zip(vectors, metas, strict=True):
            if meta[0] in self.ids:
                continue
            meta = (meta[0], clip(meta[1], NEIGHBOUR_TEXT_CHARS), clip(meta[2], NEIGHBOUR_TEXT_CHARS),
                    clip(meta[3], NEIGHBOUR_TEXT_CHARS), meta[4])
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
            self._file(slot, vec)
        if self.size >= EXACT_LIMIT and self.size >= 2 * max(self._trained_at, EXACT_LIMIT // 2):
            self._train()

    def search(self, query: np.ndarray, k: int, exclude: str | None = None) -> list[SimilarPair]:
        if k <= 0 or self.size == 0:
            return []
        if self.centroids is None:
            candidates = None
            sims = self.vectors[: self.size] @ query
        else:
            lists = self._inverted()
            probe = np.argpartition(-(self.centroids @ query), N_PROBE)[:N_PROBE]
            tail = np.arange(self._built_size, self.size)
            candidates = np.concatenate([lists[c] for c in probe] + [tail])
            sims = np.concatenate([self._list_vecs[c] @ query for c in probe] + [self.vectors[tail] @ query])
        want = min(k + 1, len(sims))
        if want == 0:
            return []
        top = np.argpartition(-sims, want - 1)[:want]
        top = top[np.argsort(-sims[top])]
        out = []
        for i in top:
            m = self.meta[int(candidates[i]) if candidates is not None else int(i)]
            if m[0] == exclude:
                continue
            out.append(SimilarPair(pair_id=m[0], prompt=m[1], chosen=m[2], rejected=m[3], label_source=m[4],
                                   similarity=float(sims[i])))
            if len(out) == k:
                break
        return out
