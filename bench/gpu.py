"""GPU bench: decoder reward models scored on a CUDA device, pairs/s and model FLOPs utilisation.

Not part of `make bench` or CI (neither has a GPU). Where one is (a few minutes on one H100/H200):

    python -m bench.gpu --out bench/results/gpu.json

On a GPU machine without network, from wheels carried in ``wheels/`` (a CUDA torch wheel and the
project's dependencies, e.g. ``pip download -d wheels -e .`` and the CUDA torch wheel on a machine
with network), one line:

    python -m venv /tmp/v && /tmp/v/bin/pip install -q --no-index --find-links wheels -e . && /tmp/v/bin/python -m bench.gpu --out gpu.json

``--smoke`` runs the same code paths on the CPU with tiny shapes in seconds (tests/test_bench_gpu.py
runs it, so this script cannot rot); its numbers mean nothing.

What it measures, for a Qwen3-0.6B-shaped and a Qwen3-8B-shaped reward model (random weights built
directly on the device in bf16; ``Qwen3ForSequenceClassification``, one scalar head) at 512 and
2,048 tokens, on synthetic chat pairs of 55-100% of that length:

1. ours bf16: ``RewardModel.score_pairs`` with the token budget and the overlap pipeline
   (tokenising and padding into page-locked memory on a CPU thread while the GPU runs);
2. ours fp32: the same code, weights in fp32 (full fp32 matmuls: ``torch.get_float32_matmul_precision``
   is reported);
3. naive: what one writes first with transformers: fp32, ``padding="max_length"``, batches of 32 in
   input order, each batch copied and read back before the next is tokenised;
4. stream: the worker's scoring path (``Scorer.score`` inside the pipeline's per-record isolation, in
   micro-batches sized by the worker's ``BatchSizer``) on in-memory pairs, no Kafka, same GPU and pairs.

Pairs/s counts pairs (two sequences each). MFU = 2 x matmul parameters x real tokens / seconds /
peak dense bf16 FLOP/s of the device (``PEAK_BF16_TFLOPS`` by device name, or ``--peak-tflops``).
Matmul parameters exclude the embedding table (a lookup, no FLOPs); attention's score and value
products are not counted either, so MFU is a lower bound, lower the longer the sequence. Padding
is not counted as work, so the naive way's padded tokens lower its MFU.

Targets checked in ``targets``: at least 40% MFU for the 0.6B shape in bf16 (batches of 32 or more
sequences: the token budget gives 128 at 512 tokens, 32 at 2,048), bf16 faster than fp32 for every
shape and length, the stream at least 0.9x the bare scorer.

With ``--data`` (pairs, JSONL/HH-RLHF, at least 1,000) it also trains the packaged MiniLM on the GPU and
compares its scores in fp32, bf16, fp16 and on the CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Published configs (config.json on the Hugging Face hub): Qwen3-0.6B and Qwen3-8B.
SHAPES: dict[str, dict[str, int]] = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
SMOKE_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024),
}
LENGTHS = (512, 2048)
SMOKE_LENGTHS = (32, 64)
# Pairs per run: (ours bf16 and the stream, ours fp32 and naive). Sized for a few minutes on one H200;
# the 8B shape gets few batches, fp32 and naive fewer pairs (they run up to ~15x slower).
PAIRS = {("0.6b", 512): (1024, 256), ("0.6b", 2048): (384, 96), ("8b", 512): (128, 32), ("8b", 2048): (48, 16)}
SMOKE_PAIRS = (8, 4)
NAIVE_BATCH = 32
WARM_UP_PAIRS = 4
MFU_TARGET = 0.40
BF16_OVER_FP32_TARGET = 1.0
STREAM_OVER_BARE_TARGET = 0.9
LONG_CONTEXT_TOKENS = 16384
# Peak dense bf16 tensor FLOP/s (no sparsity) from the vendors' data sheets, by device-name substring;
# the first match wins, so more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0), ("V100", 125.0), ("T4", 65.0),
]
WORDS = ("the cat is very helpful quite wrong about tokens long in kitchen safe and correct written markdown "
         "bold lists model reward answer seems looks stays becomes Paris student weather friend history").split()


# ---------------------------------------------------------------------------- set-up
def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((tf for name, tf in PEAK_BF16_TFLOPS if name.lower() in device_name.lower()), None)


def random_reward_model(shape: dict[str, int], tokenizer: Any, device: str, dtype: Any) -> Any:
    """A Qwen3 sequence classifier with random weights, built on ``device`` in ``dtype`` (no host copy)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    pad = tokenizer.pad_token_id
    cfg = Qwen3Config(**shape, num_labels=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                      max_position_embeddings=32768, use_cache=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForSequenceClassification(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def reward_model(model: Any, tokenizer: Any, device: str, dtype: str, max_length: int) -> Any:
    """Our serving object around an in-memory model, as ``RewardModel.load`` sets it up on ``device``."""
    from trainers.scoring.devices import DEFAULT_TOKEN_BUDGET
    from trainers.scoring.formatting import CHAT
    from trainers.scoring.model import ACCELERATOR_BATCH_SIZE, RewardModel, TorchBackend

    return RewardModel(tokenizer, TorchBackend(model, device, dtype), CHAT, max_length, ACCELERATOR_BATCH_SIZE,
                       model, None, False, None, tokenizer.pad_token_id, DEFAULT_TOKEN_BUDGET, overlap=True)


def synthetic_pairs(n: int, length: int, seed: int, tokens_per_word: float) -> list[dict]:
    """Chat pairs whose sequences are 55-100% of ``length`` tokens (about; the formatter cuts the rest)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(max(1, int(k / tokens_per_word))))  # noqa: E731
    pairs = []
    for _ in range(n):
        total = rng.uniform(0.55, 1.0) * length
        answer = rng.uniform(0.1, 0.3) * length
        pairs.append({"conversation": [{"role": "user", "content": words(total - answer)}],
                      "chosen": words(answer), "rejected": words(answer * rng.uniform(0.6, 1.0))})
    return pairs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(device: str, fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its seconds, the device's queued work included."""
    _sync(device)
    t = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return out, time.perf_counter() - t


def agreement(ref: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    n = min(len(ref[0]), len(other[0]))
    ref, other = (ref[0][:n], ref[1][:n]), (other[0][:n], other[1][:n])
    d_ref, d_other = np.sign(ref[0] - ref[1]), np.sign(other[0] - other[1])
    diff = max(np.abs(ref[0] - other[0]).max(), np.abs(ref[1] - other[1]).max())
    return {"pairs": n, "decision_agreement": float(np.mean(d_ref == d_other)), "max_abs_diff": float(diff)}


# ---------------------------------------------------------------------------- the ways of scoring
def naive_scores(model: Any, tokenizer: Any, pairs: list[dict], max_length: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """fp32 (the model as given), every sequence padded to max_length, batches in input order, each one
    tokenised, copied and read back before the next."""
    import torch

    res = []
    for key in ("chosen", "rejected"):
        texts = [tokenizer.apply_chat_template(p["conversation"] + [{"role": "assistant", "content": p[key]}], tokenize=False)
                 for p in pairs]
        scores = []
        for i in range(0, len(texts), NAIVE_BATCH):
            enc = tokenizer(texts[i: i + NAIVE_BATCH], padding="max_length", truncation=True, max_length=max_length,
                            add_special_tokens=False, return_tensors="pt")
            with torch.inference_mode():
                logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
            scores.append(logits[:, 0].float().cpu().numpy())
        res.append(np.concatenate(scores))
    return res[0], res[1]


def stream_scores(rm: Any, pairs: list[dict], bare_pairs_per_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The worker's scoring path on in-memory pairs: micro-batches as its BatchSizer cuts them after
    measuring this model, each through the score stage's per-record isolation and ``Scorer.score``."""
    from streams.runtime.isolation import isolate
    from streams.runtime.processors.scorer import Loaded, ModelSlot, Scorer
    from streams.runtime.processors.stage import Item
    from streams.runtime.worker import BatchSizer
    from streams.settings import WorkerSettings

    ws = WorkerSettings()
    sizer = BatchSizer(ws.max_batch, ws.batch_target_s)
    sizer.observe(len(pairs), len(pairs) / bare_pairs_per_s)
    scorer = Scorer(ModelSlot("current", lambda rec: None, serving=Loaded(rm, "bench")), ModelSlot("gold", lambda rec: None))
    rc, rr = [], []
    for i in range(0, len(pairs), sizer.limit):
        items = [Item(None, p) for p in pairs[i: i + sizer.limit]]
        for res in isolate("score", lambda b: scorer.score([it.pair for it in b]), items):
            rc.append(res["reward_chosen"])
            rr.append(res["reward_rejected"])
    return np.array(rc, dtype=np.float32), np.array(rr, dtype=np.float32)


# ---------------------------------------------------------------------------- one shape
def bench_shape(name: str, shape: dict[str, int], lengths: tuple[int, ...], counts: dict, device: str,
                peak: float | None) -> dict:
    import torch

    from tests.tiny_models import build_tokenizer

    tok = build_tokenizer("qwen3")
    sample = " ".join(WORDS)
    tokens_per_word = len(tok(sample, add_special_tokens=False)["input_ids"]) / len(WORDS)
    model = random_reward_model(shape, tok, device, torch.bfloat16)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    out: dict[str, Any] = {"shape": shape, "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                           "matmul_parameters_millions": round(matmul_params / 1e6, 1)}

    def rate(n_pairs: int, tokens: int, secs: float) -> dict:
        flops = 2 * matmul_params * tokens
        return {"pairs": n_pairs, "seconds": round(secs, 3), "pairs_per_s": round(n_pairs / secs, 2),
                "tokens_per_s": round(tokens / secs), "mfu": round(flops / secs / (peak * 1e12), 4) if peak else None}

    runs: dict[int, dict] = {}
    for length in lengths:
        n_fast, n_slow = counts[name, length] if (name, length) in counts else counts["smoke"]
        pairs = synthetic_pairs(n_fast, length, seed=length, tokens_per_word=tokens_per_word)
        rm = reward_model(model, tok, device, "bf16", length)
        convs = [p["conversation"] for p in pairs]
        encoded, tokenize_s = timed("cpu", rm.formatter.encode, convs + convs,
                                    [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        lens = [len(e["input_ids"]) for e in encoded]
        tokens, slow_tokens = sum(lens), sum(lens[:n_slow]) + sum(lens[n_fast: n_fast + n_slow])
        batches = rm.batches(lens)
        run: dict[str, Any] = {"mean_tokens_per_sequence": round(float(np.mean(lens)), 1),
                               "sequences_per_batch_bf16": [min(len(b) for b in batches), max(len(b) for b in batches)],
                               "tokenize_s": round(tokenize_s, 3)}
        rm.score_pairs(pairs[:WARM_UP_PAIRS])  # kernels, allocator, page-locked pool
        bf16, secs = timed(device, rm.score_pairs, pairs)
        run["ours_bf16"] = rate(len(pairs), tokens, secs)
        stream, s_secs = timed(device, stream_scores, rm, pairs, len(pairs) / secs)
        run["stream_bf16"] = rate(len(pairs), tokens, s_secs)
        run["stream_over_bare"] = round(secs / s_secs, 3)
        run["stream_vs_bare_scores"] = agreement(bf16, stream)
        runs[length] = {"run": run, "pairs": pairs, "n_slow": n_slow, "slow_tokens": slow_tokens, "bf16": bf16}
    model.float()  # the same weights in fp32, in place (an 8B model in both precisions would double the memory)
    for length, r in runs.items():
        run, sub = r["run"], r["pairs"][: r["n_slow"]]
        rm = reward_model(model, tok, device, "fp32", length)
        rm.score_pairs(sub[:WARM_UP_PAIRS])
        fp32, secs = timed(device, rm.score_pairs, sub)
        run["ours_fp32"] = rate(len(sub), r["slow_tokens"], secs)
        naive, n_secs = timed(device, naive_scores, model, tok, sub, length, device)
        run["naive_fp32_max_length"] = rate(len(sub), r["slow_tokens"], n_secs)
        run["bf16_over_fp32"] = round(run["ours_bf16"]["pairs_per_s"] / run["ours_fp32"]["pairs_per_s"], 2)
        run["ours_bf16_over_naive"] = round(run["ours_bf16"]["pairs_per_s"] / run["naive_fp32_max_length"]["pairs_per_s"], 2)
        run["bf16_vs_fp32_scores"] = agreement(fp32, r["bf16"])
        run["naive_vs_ours_fp32_scores"] = agreement(fp32, naive)
        if length == lengths[0]:
            few = sub[:16]
            batched = rm.score([p["conversation"] for p in few], [p["chosen"] for p in few])
            single = np.array([rm.score([p["conversation"]], [p["chosen"]])[0] for p in few])
            out["batched_vs_one_at_a_time_max_abs_diff_fp32"] = float(np.abs(batched - single).max())
        out[f"tokens_{length}"] = run
    return out


def long_context(device: str, smoke: bool) -> dict:
    """One conversation far over the budget: left truncation keeps the response, memory stays bounded."""
    import torch

    from tests.tiny_models import build_tokenizer

    tok = build_tokenizer("qwen3")
    shape = SMOKE_SHAPES["tiny"] if smoke else SHAPES["0.6b"]
    max_length = 512 if smoke else LONG_CONTEXT_TOKENS
    rm = reward_model(random_reward_model(shape, tok, device, torch.bfloat16), tok, device, "bf16", max_length)
    conv = [{"role": "user", "content": " ".join(["history"] * (max_length + 4000))}]
    ids = rm.formatter.encode([conv], ["the final answer is kept"])[0]["input_ids"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    (r,), secs = timed(device, rm.score, [conv], ["the final answer is kept"])
    return {"tokens": len(ids), "response_kept": "final answer is kept" in tok.decode(ids), "finite": bool(np.isfinite(r)),
            "seconds": round(secs, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None}


def targets(result: dict) -> dict:
    shapes = result["shapes"]
    checks: dict[str, Any] = {}
    small = shapes.get("0.6b")
    if small:
        best = max(small[f"tokens_{n}"]["ours_bf16"]["mfu"] or 0 for n in LENGTHS)
        checks["mfu_0.6b_bf16"] = {"best": best, "target": MFU_TARGET, "met": best >= MFU_TARGET,
                                   "batch_sequences": [small[f"tokens_{n}"]["sequences_per_batch_bf16"] for n in LENGTHS]}
    runs = [(name, key, run) for name, s in shapes.items() for key, run in s.items() if key.startswith("tokens_")]
    checks["bf16_faster_than_fp32"] = {f"{n}/{k}": r["bf16_over_fp32"] for n, k, r in runs}
    checks["bf16_faster_than_fp32"]["met"] = all(r["bf16_over_fp32"] > BF16_OVER_FP32_TARGET for _, _, r in runs)
    checks["stream_over_bare"] = {f"{n}/{k}": r["stream_over_bare"] for n, k, r in runs}
    checks["stream_over_bare"]["met"] = all(r["stream_over_bare"] >= STREAM_OVER_BARE_TARGET for _, _, r in runs)
    return checks


# ---------------------------------------------------------------------------- trained MiniLM (--data)
def train_minilm(train_pairs: list[dict], eval_pairs: list[dict], out: Path, steps: int) -> dict:
    from trainers.training.train import TrainConfig, train

    cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=32, max_length=512, eval_every=0,
                      progress=False, plot=False, device="cuda")
    m = train(cfg, train_pairs, eval_pairs).metrics
    return {"steps": steps, "batch_size": 32, "pairs_per_s": m["pairs_per_second"], "first_loss": round(m["first_loss"], 4),
            "final_loss": round(m["final_loss"], 4), "heldout_accuracy": m["eval_accuracy"]}


def dtype_agreement(model_dir: Path, pairs: list[dict]) -> dict:
    from trainers.scoring.model import RewardModel

    ref = RewardModel.load(model_dir, device="cuda").score_pairs(pairs)
    out: dict[str, Any] = {"pairs": len(pairs)}
    for dtype in ("bf16", "fp16"):
        out[f"cuda_{dtype}"] = agreement(ref, RewardModel.load(model_dir, device="cuda", dtype=dtype).score_pairs(pairs))
    out["cpu_fp32"] = agreement(ref, RewardModel.load(model_dir).score_pairs(pairs))
    return out


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="where to write the JSON result")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the code paths in seconds, no figures")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes to run (%(default)s)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s of the device, for MFU (default: from PEAK_BF16_TFLOPS by device name)")
    ap.add_argument("--data", type=Path, default=None,
                    help="optional JSONL/HH-RLHF pairs (1,000+): also train MiniLM on the GPU and compare dtypes")
    ap.add_argument("--train-steps", type=int, default=150)
    args = ap.parse_args(argv)
    if args.smoke:
        device, shapes, lengths = "cpu", SMOKE_SHAPES, SMOKE_LENGTHS
        counts: dict = {"smoke": SMOKE_PAIRS}
        name = "cpu (smoke: the code paths only, no figures)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.gpu needs a CUDA GPU and torch sees none; `python -m bench.gpu --smoke` checks the "
                             "code paths on the CPU")
        device, lengths, counts = "cuda", LENGTHS, PAIRS
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak,
                              "fp32_matmul_precision": torch.get_float32_matmul_precision(), "shapes": {}}
    started = time.perf_counter()
    for shape_name, shape in shapes.items():
        t = time.perf_counter()
        result["shapes"][shape_name] = bench_shape(shape_name, shape, lengths, counts, device, peak)
        result["shapes"][shape_name]["wall_s"] = round(time.perf_counter() - t, 1)
        if device == "cuda":
            torch.cuda.empty_cache()  # the shape's model is gone; its cached blocks would crowd the next one
        print(json.dumps({shape_name: result["shapes"][shape_name]}, indent=1), flush=True)
    result["long_context"] = long_context(device, args.smoke)
    result["targets"] = targets(result)
    if args.data and not args.smoke:
        from trainers.training.data import read_pairs

        pairs = read_pairs([args.data])
        with tempfile.TemporaryDirectory() as tmp:
            result["train_minilm"] = train_minilm(pairs[:800], pairs[800:1000], Path(tmp) / "minilm", args.train_steps)
            result["dtype_agreement_trained_minilm"] = dtype_agreement(Path(tmp) / "minilm", pairs[:1000])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"targets": result["targets"], "long_context": result["long_context"], "wall_s": result["wall_s"]},
                     indent=1))
    return result


if __name__ == "__main__":
    main()
