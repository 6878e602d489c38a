"""Scoring throughput: our ONNX paths (fp32 and INT8) with dynamic padding vs the naive transformers way.

Naive = what a user writes first: transformers fp32, ``padding="max_length"``, fixed batches in
input order. All score the same real HH-RLHF pairs with the same trained model; each reports its
decision agreement with fp32 torch. "Served" is the file the scorer would load: INT8 only when it
agrees on at least 99.5% (the export check's rule), else the fp32 ONNX.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import hh_pairs, write_result

NAIVE_BATCH = 32


def naive_scores(model_dir, pairs, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers.scoring.formatting import conversation_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    out = []
    for key in ("chosen", "rejected"):
        scores = []
        for i in range(0, len(pairs), NAIVE_BATCH):
            batch = pairs[i: i + NAIVE_BATCH]
            enc = tok([conversation_text(p["conversation"]) for p in batch], [p[key] for p in batch],
                      padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                scores.append(model(**enc).logits[:, 0].numpy())
        out.append(np.concatenate(scores))
    return out[0], out[1]


def _ours(model_dir: str, onnx_file: str, pairs, max_length: int, ref: np.ndarray) -> dict:
    from trainers.scoring.model import RewardModel

    rm = RewardModel.load(model_dir, backend="onnx", onnx_file=onnx_file, max_length=max_length)  # our default batching
    t = time.perf_counter()
    c, r = rm.score_pairs(pairs)
    secs = time.perf_counter() - t
    return {"seconds": secs, "pairs_per_s": round(len(pairs) / secs, 2), "agreement": float(np.mean(np.sign(c - r) == ref))}


def run(model_dir: str, n_pairs: int, max_length: int) -> dict:
    from trainers.scoring.model import ONNX_FP32, ONNX_INT8, RewardModel

    pairs = hh_pairs(n_pairs)
    tc, tr = RewardModel.load(model_dir, max_length=max_length).score_pairs(pairs)
    ref = np.sign(tc - tr)
    t = time.perf_counter()
    nc, nr = naive_scores(model_dir, pairs, max_length)
    naive_s = time.perf_counter() - t
    fp32 = _ours(model_dir, ONNX_FP32, pairs, max_length, ref)
    int8 = _ours(model_dir, ONNX_INT8, pairs, max_length, ref)
    # What the scorer serves: INT8 only when it meets the agreement target (the export check's rule).
    served = "int8" if int8["agreement"] >= 0.995 else "fp32"
    best = int8 if served == "int8" else fp32
    return {
        "pairs": len(pairs), "max_length": max_length, "naive_pairs_per_s": round(len(pairs) / naive_s, 2),
        "onnx_fp32_pairs_per_s": fp32["pairs_per_s"], "onnx_int8_pairs_per_s": int8["pairs_per_s"],
        "speedup_onnx_fp32": round(naive_s / fp32["seconds"], 2), "speedup_onnx_int8": round(naive_s / int8["seconds"], 2),
        "decision_agreement_onnx_fp32_vs_torch_fp32": fp32["agreement"],
        "decision_agreement_int8_vs_torch_fp32": int8["agreement"],
        "naive_vs_torch_fp32_agreement": float(np.mean(np.sign(nc - nr) == ref)),
        "served": served, "ours_pairs_per_s": best["pairs_per_s"], "speedup": round(naive_s / best["seconds"], 2),
        "targets": {"speedup": ">= 4x", "agreement": ">= 0.995"},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="a model directory with model.onnx and model.int8.onnx")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args(argv)
    result = run(args.model, args.pairs, args.max_length)
    write_result("scoring", result, f"python -m bench.scoring --model {args.model} --pairs {args.pairs}")
    return result


if __name__ == "__main__":
    print(main())
