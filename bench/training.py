"""Training throughput and held-out accuracy: `prefstream train` vs TRL's RewardTrainer.

Same model (packaged MiniLM-L6 with a new head, same seed), same pairs, batch size, steps,
learning rate and max length, 2 CPU threads, dropout off in both (TRL's default and ours). Ours
runs as a full fine-tune (the same work as TRL) and with our CPU recipe (the token-embedding
matrix frozen, plus ``--freeze-layers`` lowest layers, 0 by default), each with its held-out
accuracy beside its speed. TRL and the recipe run twice, in the order TRL, recipe, full, recipe,
TRL, and each row uses the mean time of its runs, so a steady drift of the machine's speed cancels.
TRL drops pairs longer than max_length, so the pairs are pre-filtered to those that fit, and both
trainers see exactly the same ones. Each model is scored on the held-out pairs with the input
format it was trained with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import hh_pairs, write_result


def _fits(tok, pairs, max_length: int) -> list[dict]:
    from trainers.scoring.formatting import conversation_text

    out = []
    for p in pairs:
        prompt = conversation_text(p["conversation"]) + "\n"
        if all(len(tok(prompt + p[k])["input_ids"]) <= max_length for k in ("chosen", "rejected")):
            out.append(p)
    return out


def _trl_accuracy(model, tok, pairs) -> float:
    import torch

    from trainers.scoring.formatting import conversation_text

    model.eval()
    wins = []
    with torch.no_grad():
        for p in pairs:
            prompt = conversation_text(p["conversation"]) + "\n"
            enc = tok([prompt + p["chosen"], prompt + p["rejected"]], return_tensors="pt", padding=True)
            r = model(**enc).logits[:, 0]
            wins.append(bool(r[0] > r[1]))
    return float(np.mean(wins))


def run_trl(train_pairs, eval_pairs, steps: int, batch: int, lr: float, max_length: int, seed: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from trainers.scoring.formatting import conversation_text
    from trainers.scoring.model import default_base_path

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(default_base_path())
    tok.eos_token = tok.sep_token  # TRL appends eos; BERT tokenizers have none (docs/design.md, Environment facts)
    model = AutoModelForSequenceClassification.from_pretrained(default_base_path(), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list([{"prompt": conversation_text(p["conversation"]) + "\n", "chosen": p["chosen"],
                             "rejected": p["rejected"]} for p in train_pairs])
    cfg = RewardConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                       max_length=max_length, report_to="none", logging_steps=max(1, steps // 5), save_strategy="no",
                       use_cpu=True, seed=seed, dataloader_num_workers=0, warmup_steps=max(1, steps // 10),
                       disable_tqdm=True,
                       # TRL defaults to bf16 autocast and gradient checkpointing; both are slow on a CPU
                       # without bf16 units and neither is what ours does. Compare like with like: fp32.
                       bf16=False, gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t
    return {"seconds": round(secs, 2), "pairs_per_s": round(steps * batch / secs, 3),
            "heldout_accuracy": _trl_accuracy(trainer.model, tok, eval_pairs)}


def run_ours(train_pairs, eval_pairs, steps: int, batch: int, lr: float, max_length: int, seed: int, out: Path,
             freeze_layers: int = 0, freeze_embeddings: bool = False) -> dict:
    from trainers.training.train import TrainConfig, train

    cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=batch, learning_rate=lr, max_length=max_length,
                      eval_every=0, seed=seed, progress=False, plot=False, warmup_ratio=0.1, freeze_layers=freeze_layers,
                      freeze_embeddings=freeze_embeddings)
    res = train(cfg, train_pairs, eval_pairs)
    m = res.metrics
    return {"seconds": m["train_seconds"], "pairs_per_s": round(steps * batch / m["train_seconds"], 3),
            "heldout_accuracy": m["eval_accuracy"], "model_dir": str(res.output_dir)}


def _merge(a: dict, b: dict, steps_x_batch: int) -> dict:
    """Two runs of one trainer as one row: pairs/s over their mean time, and the mean accuracy.

    Both trainers are seeded, so the accuracies should repeat; both are kept to show it.
    """
    secs = (a["seconds"] + b["seconds"]) / 2
    accs = [a["heldout_accuracy"], b["heldout_accuracy"]]
    return b | {"seconds": round(secs, 2), "seconds_each": [a["seconds"], b["seconds"]],
                "pairs_per_s": round(steps_x_batch / secs, 3), "heldout_accuracy": float(np.mean(accs)),
                "heldout_accuracy_each": accs}


def run(n_train: int, n_eval: int, steps: int, batch: int, lr: float, max_length: int, seed: int,
        keep_model: Path | None, freeze_layers: int, freeze_embeddings: bool) -> dict:
    import torch
    from transformers import AutoTokenizer

    from trainers.scoring.model import default_base_path

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(default_base_path())
    pairs = _fits(tok, hh_pairs(10**9), max_length)
    if len(pairs) < n_train + n_eval:
        raise SystemExit(f"only {len(pairs)} shared pairs fit in {max_length} tokens; "
                         f"ask for fewer than {n_train} + {n_eval} or a longer --max-length")
    train_pairs, eval_pairs = pairs[:n_train], pairs[n_train: n_train + n_eval]
    steps_x_batch = steps * batch

    def trl_run() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return run_trl(train_pairs, eval_pairs, steps, batch, lr, max_length, seed, Path(tmp) / "trl")

    def recipe_run(out: Path) -> dict:
        # Our CPU recipe: the token embeddings (and any --freeze-layers lowest layers) stay frozen, the
        # rest trains as in the full fine-tune. Same model, data, batch size and steps; the retrain jobs run it.
        return run_ours(train_pairs, eval_pairs, steps, batch, lr, max_length, seed, out,
                        freeze_layers=freeze_layers, freeze_embeddings=freeze_embeddings)

    # Palindromic order (TRL, recipe, full, recipe, TRL): this shared machine's speed drifts by 10-20%
    # over minutes, and with every trainer's runs centred on the same moment a steady drift cancels
    # out of the ratios instead of favouring whichever trainer ran while the machine was fast.
    trl_a = trl_run()
    with tempfile.TemporaryDirectory() as tmp:
        ours_a = recipe_run(Path(tmp) / "recipe")
    with tempfile.TemporaryDirectory() as tmp:
        full = run_ours(train_pairs, eval_pairs, steps, batch, lr, max_length, seed, Path(tmp) / "full")
    ours_b = recipe_run(keep_model or Path(tempfile.mkdtemp()))
    trl_b = trl_run()
    trl, ours = _merge(trl_a, trl_b, steps_x_batch), _merge(ours_a, ours_b, steps_x_batch)
    return {
        "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "steps": steps, "batch_size": batch,
        "learning_rate": lr, "max_length": max_length, "threads": 2, "freeze_layers": freeze_layers,
        "freeze_embeddings": freeze_embeddings, "dropout": "off in both",
        "ours": ours, "ours_full_fine_tune": full, "trl": trl,
        "speedup": round(ours["pairs_per_s"] / trl["pairs_per_s"], 2),
        "speedup_full_fine_tune": round(full["pairs_per_s"] / trl["pairs_per_s"], 2),
        "targets": {"speedup": ">= 1.5x", "accuracy": "ours >= trl"},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    # Long enough to leave chance on HH-RLHF harmless (both reach ~0.62 held-out), short enough
    # for 2 cores: 3 epochs of 800 pairs at 128 tokens (1,064 of the 2,303 shared pairs fit).
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--eval", type=int, default=264)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freeze-layers", type=int, default=0,
                    help="our recipe's frozen lower layers (the full fine-tune is measured too)")
    ap.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                    help="our recipe freezes the token-embedding matrix")
    ap.add_argument("--keep-model", type=Path, default=None, help="keep our trained model here (the scoring bench uses it)")
    args = ap.parse_args(argv)
    result = run(args.train, args.eval, args.steps, args.batch, args.lr, args.max_length, args.seed, args.keep_model,
                 args.freeze_layers, args.freeze_embeddings)
    args_used = sys.argv[1:] if argv is None else argv
    write_result("training", result, " ".join(["python -m bench.training", *args_used]))
    return result


if __name__ == "__main__":
    print(main())
