"""Retrieval: p99 latency of NeighbourIndex.search at 100k indexed prompts, and recall@8 vs a full sort.

Vectors are clustered unit vectors (real prompt embeddings cluster by topic), 384-d like MiniLM.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import write_result


def run(n: int, queries: int, k: int, dim: int = 384, seed: int = 0) -> dict:
    from streams.runtime.retrieval.index import NeighbourIndex

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim)).astype(np.float32)
    vecs = centres[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = NeighbourIndex(dim, capacity=n)
    t = time.perf_counter()
    index.add(vecs, [(f"p{i}", "", "", "", "human") for i in range(n)])
    build_s = time.perf_counter() - t
    qs = vecs[rng.integers(0, n, queries)] + 0.1 * rng.normal(size=(queries, dim)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    lat, hits = [], 0
    for q in qs:
        t = time.perf_counter()
        got = index.search(q, k)
        lat.append(time.perf_counter() - t)
        exact = set(np.argsort(-(vecs @ q))[:k])  # the naive reference: a full sort of every similarity
        hits += len({int(g["pair_id"][1:]) for g in got} & exact)
    lat_ms = np.array(lat) * 1000
    return {"indexed": n, "queries": queries, "k": k, "p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 3), "recall_at_k": hits / (queries * k),
            "build_seconds": round(build_s, 2), "targets": {"p99_ms": "< 20", "recall_at_8": ">= 0.95"}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args(argv)
    result = run(args.n, args.queries, 8)
    write_result("retrieval", result, f"python -m bench.retrieval --n {args.n} --queries {args.queries}")
    return result


if __name__ == "__main__":
    print(main())
