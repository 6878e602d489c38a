"""GPU check: the torch scoring path (fp32/bf16/fp16) and training on a CUDA device.

Not part of `make bench` or CI (neither has a GPU). Run it where one is:

    python -m bench.gpu --data pairs.jsonl.gz --out gpu.json

What it does, all on the same real pairs:

1. Trains the packaged MiniLM reward model on the GPU (`trainers.train` with device cuda) and
   reports pairs/s, the loss and held-out accuracy.
2. Scores with that trained model in fp32, bf16 and fp16 on the GPU, and in fp32 on the CPU:
   decision agreement and the largest score difference of each against GPU fp32.
3. Builds a larger random Qwen3-style reward model (the architecture tests' builder, bigger sizes)
   and scores through the chat-template path: pairs/s per dtype, ours (bf16, length-sorted dynamic
   padding) vs the naive way (fp32, ``padding="max_length"``, batches in input order), the same
   pairs scored one at a time vs batched (padding must not change a score), and one 16K-token
   conversation (left truncation keeps the response).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

MEDIUM = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=8, head_dim=64, max_position_embeddings=32768)


def _timed(fn):
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _agreement(ref: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    d_ref, d_other = np.sign(ref[0] - ref[1]), np.sign(other[0] - other[1])
    diff = max(np.abs(ref[0] - other[0]).max(), np.abs(ref[1] - other[1]).max())
    return {"decision_agreement": float(np.mean(d_ref == d_other)), "max_abs_diff": float(diff)}


def train_minilm(train_pairs, eval_pairs, out: Path, steps: int) -> dict:
    from trainers.train import TrainConfig, train

    cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=32, max_length=512, eval_every=0,
                      progress=False, plot=False, device="cuda")
    res = train(cfg, train_pairs, eval_pairs)
    m = res.metrics
    return {"steps": steps, "batch_size": 32, "pairs_per_s": m["pairs_per_second"], "first_loss": round(m["first_loss"], 4),
            "final_loss": round(m["final_loss"], 4), "heldout_accuracy": m["eval_accuracy"],
            "trainable_parameters_changed": f"{m['trainable_parameters_changed']}/{m['trainable_parameters']}"}


def dtype_agreement(model_dir: Path, pairs) -> dict:
    from trainers.model import RewardModel

    ref = RewardModel.load(model_dir, device="cuda").score_pairs(pairs)
    out = {"pairs": len(pairs)}
    for dtype in ("bf16", "fp16"):
        out[f"cuda_{dtype}"] = _agreement(ref, RewardModel.load(model_dir, device="cuda", dtype=dtype).score_pairs(pairs))
    out["cpu_fp32"] = _agreement(ref, RewardModel.load(model_dir).score_pairs(pairs))
    return out


def naive_scores(rm, pairs, max_length: int, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The way a user writes it first: every sequence padded to max_length, fp32, input order."""
    import torch

    model = rm.backend.model
    pad = rm.tokenizer.pad_token_id
    res = []
    for key in ("chosen", "rejected"):
        enc = rm.formatter.encode([p["conversation"] for p in pairs], [p[key] for p in pairs])
        scores = []
        for i in range(0, len(enc), batch):
            ids = np.full((len(enc[i: i + batch]), max_length), pad, dtype=np.int64)
            mask = np.zeros_like(ids)
            for j, e in enumerate(enc[i: i + batch]):
                ids[j, : len(e["input_ids"])] = e["input_ids"]
                mask[j, : len(e["input_ids"])] = 1
            with torch.inference_mode():
                logits = model(input_ids=torch.from_numpy(ids).cuda(), attention_mask=torch.from_numpy(mask).cuda()).logits
            scores.append(logits[:, 0].float().cpu().numpy())
        res.append(np.concatenate(scores))
    return res[0], res[1]


def batch_sweep(rm, pairs) -> dict:
    """Pairs/s of the whole score_pairs call by batch size, and the share of it spent tokenizing."""
    convs = [p["conversation"] for p in pairs]
    _, enc_s = _timed(lambda: rm.formatter.encode(convs + convs, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]))
    out = {"tokenize_s": round(enc_s, 3)}
    for bs in (32, 64, 128, 256):
        rm.batch_size = bs
        _, secs = _timed(lambda: rm.score_pairs(pairs))
        out[f"batch_{bs}"] = {"pairs_per_s": round(len(pairs) / secs, 1), "tokenize_share": round(enc_s / secs, 2)}
    rm.batch_size = 32
    return out


def decoder_checks(pairs, work: Path, max_length: int, naive_pairs: int) -> dict:
    import torch

    from tests.tiny_models import build_tiny_decoder
    from trainers.model import RewardModel

    path = build_tiny_decoder("qwen3", work / "qwen3-medium", seed=0, **MEDIUM)
    out: dict = {"config": MEDIUM, "max_length": max_length, "pairs": len(pairs)}
    models = {d: RewardModel.load(path, device="cuda", dtype=d, max_length=max_length) for d in ("fp32", "bf16", "fp16")}
    out["parameters_millions"] = round(sum(p.numel() for p in models["fp32"].backend.model.parameters()) / 1e6, 1)
    scores = {}
    for dtype, rm in models.items():
        rm.score_pairs(pairs[:64])  # warm-up: kernels, allocator
        scores[dtype], secs = _timed(lambda rm=rm: rm.score_pairs(pairs))
        out[f"{dtype}_pairs_per_s"] = round(len(pairs) / secs, 1)
    for dtype in ("bf16", "fp16"):
        out[f"{dtype}_vs_fp32"] = _agreement(scores["fp32"], scores[dtype])
    sub = pairs[:naive_pairs]
    naive, naive_s = _timed(lambda: naive_scores(models["fp32"], sub, max_length))
    ours, ours_s = _timed(lambda: models["bf16"].score_pairs(sub))
    out["naive_vs_ours"] = {"pairs": len(sub), "naive_fp32_max_length_pairs_per_s": round(len(sub) / naive_s, 1),
                            "ours_bf16_dynamic_pairs_per_s": round(len(sub) / ours_s, 1),
                            "speedup": round(naive_s / ours_s, 2),
                            "naive_fp32_vs_ours_fp32": _agreement(naive, tuple(s[: len(sub)] for s in scores["fp32"]))}
    out["batch_size_sweep_bf16"] = batch_sweep(models["bf16"], pairs)
    rm = models["fp32"]
    few = pairs[:32]
    batched = rm.score([p["conversation"] for p in few], [p["chosen"] for p in few])
    single = np.array([rm.score([p["conversation"]], [p["chosen"]])[0] for p in few])
    out["batched_vs_single_max_abs_diff_fp32"] = float(np.abs(batched - single).max())
    long_conv = [{"role": "user", "content": " ".join(["history"] * 20000)}]
    rm16 = RewardModel.load(path, device="cuda", dtype="bf16", max_length=16384)
    ids = rm16.formatter.encode([long_conv], ["the final answer is kept"])[0]["input_ids"]
    torch.cuda.reset_peak_memory_stats()
    (r,), secs = _timed(lambda: rm16.score([long_conv], ["the final answer is kept"]))
    out["long_context"] = {"tokens": len(ids), "response_kept": "final answer is kept" in rm16.tokenizer.decode(ids),
                           "finite": bool(np.isfinite(r)), "seconds": round(secs, 3),
                           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch

    from trainers.data import read_pairs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="JSONL/HH-RLHF pairs (at least 1,000)")
    ap.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--max-length", type=int, default=2048, help="max length of the decoder checks")
    ap.add_argument("--naive-pairs", type=int, default=256)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU; torch sees none")
    pairs = read_pairs([args.data])
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "pairs": len(pairs)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_pairs, eval_pairs = pairs[:800], pairs[800:1000]
        t = time.perf_counter()
        result["train_minilm"] = train_minilm(train_pairs, eval_pairs, work / "minilm", args.train_steps)
        result["train_minilm"]["wall_s"] = round(time.perf_counter() - t, 1)
        result["dtype_agreement_trained_minilm"] = dtype_agreement(work / "minilm", pairs[:1000])
        print(json.dumps(result, indent=1), flush=True)
        result["decoder"] = decoder_checks(pairs[:1000], work, args.max_length, args.naive_pairs)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
