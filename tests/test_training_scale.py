"""Training at the scale of large decoder reward models, checked on the CPU with tiny Qwen3- and
Llama-like models: LoRA merged into plain weights, gradient checkpointing, accumulation to a token
budget, resuming from a checkpoint, bf16 autocast, fp16 refused on the CPU, data-parallel ranks under
torchrun (gloo), and the retrain Job that asks for GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from streams.runtime.jobs import JobTemplate, LocalRunner, job_manifest
from tests.helpers import ROOT, assert_trained, toy_pairs
from tests.tiny_models import build_tiny_decoder
from trainers.exceptions import TrainerError
from trainers.scoring.model import RewardModel
from trainers.scoring.precision import grad_scaler
from trainers.training import checkpoint
from trainers.training.lora import apply_lora, merge_lora
from trainers.training.recipe import step_batches
from trainers.training.train import StepRunner, TrainConfig, _encode, _prepare_trainable, train

KINDS = ["qwen3", "llama"]
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny decoder reward model directory per kind, built on first use."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_tiny_decoder(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


def _cfg(base: Path, out: Path | str = "unused", **kw) -> TrainConfig:
    opts = dict(base_model=str(base), output_dir=str(out), batch_size=4, max_length=MAX_LENGTH, learning_rate=1e-3,
                eval_every=0, progress=False, plot=False, seed=0) | kw
    return TrainConfig(**opts)


def _prepared(base: Path, cfg: TrainConfig, pairs: list[dict]) -> tuple[RewardModel, StepRunner, object]:
    """A model made trainable as train() makes it, and the step runner over ``pairs``."""
    rm = RewardModel.load(base, max_length=MAX_LENGTH)
    torch.manual_seed(cfg.seed)  # the LoRA A matrices start random: equal seeds, equal adapters
    wrapped = _prepare_trainable(rm.torch_model, cfg)
    return rm, StepRunner(rm.torch_model, rm.formatter, _encode(rm, pairs, True), cfg, "cpu", 0), wrapped


def _grads(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient (a KeyError-free None check: each must have one)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            out[name] = p.grad.detach().clone()
    return out


def _scores(rm: RewardModel, pairs: list[dict]) -> np.ndarray:
    return np.concatenate(rm.score_pairs(pairs))


# ------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_and_the_merged_model_scores_like_the_adapters(kind, tiny, tmp_path):
    pairs = toy_pairs(8)
    cfg = _cfg(tiny(kind), lora_r=4, lora_alpha=8)
    rm, runner, wrapped = _prepared(tiny(kind), cfg, pairs)
    model = rm.torch_model
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler, losses = grad_scaler("fp32", "cpu"), []
    for _ in range(6):
        optimizer.zero_grad()
        losses.append(runner.backward([list(range(len(pairs)))], scaler))
        optimizer.step()
    assert losses[-1] < losses[0], losses
    model.eval()
    with_adapters = _scores(rm, pairs)
    rm.torch_model = rm.backend.model = merge_lora(wrapped)
    out = rm.save(tmp_path / "merged")
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(load_file(str(tiny(kind) / "model.safetensors"))), "the merged model is a plain model"
    merged = _scores(RewardModel.load(out), pairs)
    assert np.abs(merged - with_adapters).max() < 1e-5
    assert np.std(merged) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_lora_run_changes_only_the_target_layers_and_the_head(kind, tiny, tmp_path):
    pairs = toy_pairs(24)
    res = train(_cfg(tiny(kind), tmp_path / "out", lora_r=4, learning_rate=1e-2, max_steps=8, plot=True),
                pairs[:16], pairs[16:])
    assert_trained(res, min_accuracy=0.5)
    base = load_file(str(tiny(kind) / "model.safetensors"))
    new = load_file(str(res.output_dir / "model.safetensors"))
    assert set(new) == set(base) and new["score.weight"].dtype == torch.float32
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    # peft's default targets for both architectures: the attention query and value projections.
    assert changed == {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight")) or k.startswith("score.")}
    assert res.metrics["trainable_weights"] < 0.1 * sum(t.numel() for t in base.values())


def test_lora_targets_that_match_nothing_or_a_missing_peft_say_the_fix(tiny, monkeypatch):
    rm = RewardModel.load(tiny("qwen3"), max_length=MAX_LENGTH)
    with pytest.raises(TrainerError, match="lora-targets|matched no layer"):
        apply_lora(rm.torch_model, 4, 8, 0.0, "no_such_proj")
    monkeypatch.setitem(sys.modules, "peft", None)  # what an install without the extra looks like
    with pytest.raises(TrainerError, match=r"prefstream\[lora\]"):
        apply_lora(rm.torch_model, 4, 8, 0.0, "auto")


# ----------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind, lora_r, tiny):
    """With the embeddings frozen the layers' inputs need no grad: non-reentrant checkpointing must
    still reach every trainable weight and the head."""
    pairs = toy_pairs(6)
    grads = []
    for checkpointing in (False, True):
        cfg = _cfg(tiny(kind), gradient_checkpointing=checkpointing, freeze_embeddings=True, lora_r=lora_r)
        rm, runner, _ = _prepared(tiny(kind), cfg, pairs)
        assert rm.torch_model.is_gradient_checkpointing == checkpointing
        runner.backward([[0, 1, 2], [3, 4, 5]], grad_scaler("fp32", "cpu"))
        grads.append(_grads(rm.torch_model))
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(n.startswith("score") and g.abs().sum() > 0 for n, g in checkpointed.items())


# ------------------------------------------------------------------------------- token budget
def test_a_token_budget_step_has_the_gradient_of_one_big_batch(tiny):
    pairs = toy_pairs(10)
    pairs[2]["chosen"] += " and a longer explanation" * 4  # uneven lengths and sizes
    cfg = _cfg(tiny("llama"))
    rm, runner, _ = _prepared(tiny("llama"), cfg, pairs)
    tokens = runner.data.tokens
    budget = sum(tokens[:6]) - 1  # reached only by the second micro-batch
    pending = [[6, 7, 8, 9], [3, 4, 5], [0, 1, 2]]  # popped from the end

    def refill():
        raise AssertionError("the step must not start a new epoch")

    micro = step_batches(pending, refill, tokens, grad_accum=1, tokens_per_step=budget)
    assert micro == [[0, 1, 2], [3, 4, 5]] and pending == [[6, 7, 8, 9]]
    results = []
    for batches in (micro, [[0], [1, 2, 3, 4, 5]], [list(range(6))]):
        rm.torch_model.zero_grad(set_to_none=True)
        loss = runner.backward(batches, grad_scaler("fp32", "cpu"))
        results.append((loss, _grads(rm.torch_model)))
    big_loss, big = results[-1]
    for loss, grads in results[:-1]:
        assert loss == pytest.approx(big_loss, rel=1e-5)
        for name in big:
            torch.testing.assert_close(grads[name], big[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_run_with_a_token_budget_takes_at_least_the_budget_each_step(tiny, tmp_path):
    pairs = toy_pairs(24)
    res = train(_cfg(tiny("qwen3"), tmp_path / "out", batch_size=2, tokens_per_step=400, max_steps=4), pairs, [])
    m = res.metrics
    assert m["steps"] == 4 and m["tokens_seen"] >= 4 * 400 and m["pairs_seen"] > 4 * 2  # > 1 micro-batch a step


# ------------------------------------------------------------------------------------- resume
def test_a_resumed_run_continues_from_its_checkpoint_to_the_same_weights(tiny, tmp_path, monkeypatch):
    pairs = toy_pairs(24)
    common = dict(batch_size=2, tokens_per_step=300, max_steps=6, checkpoint_every=3, learning_rate=3e-3)
    steps_run = []
    original = StepRunner.backward

    def counting(self, micro, scaler):
        steps_run.append(len(micro))
        return original(self, micro, scaler)

    monkeypatch.setattr(StepRunner, "backward", counting)
    full = train(_cfg(tiny("qwen3"), tmp_path / "full", **common), pairs[:16], pairs[16:])
    ckpt = tmp_path / "full" / "checkpoints" / "step-3"
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["step-3"]  # none at the last step
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}  # no pickle
    assert checkpoint.resolve("latest", str(tmp_path / "full")) == ckpt
    assert len(steps_run) == 6
    steps_run.clear()

    resumed = train(_cfg(tiny("qwen3"), tmp_path / "resumed", resume_from=str(ckpt), **common), pairs[:16], pairs[16:])
    assert len(steps_run) == 3, "the resumed run must run only the steps after its checkpoint"
    assert resumed.metrics["resumed_from"] == str(ckpt) and resumed.metrics["steps"] == 6
    assert resumed.metrics["tokens_seen"] == full.metrics["tokens_seen"]
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in full.history], rtol=1e-5)
    a, b = (load_file(str(r.output_dir / "model.safetensors")) for r in (full, resumed))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)

    with pytest.raises(TrainerError, match="belongs to another run"):
        train(_cfg(tiny("qwen3"), tmp_path / "other", resume_from=str(ckpt), **(common | {"max_steps": 8})),
              pairs[:16], pairs[16:])
    with pytest.raises(TrainerError, match="not a checkpoint directory"):
        train(_cfg(tiny("qwen3"), tmp_path / "other", resume_from=str(tmp_path), **common), pairs[:16], pairs[16:])


# ---------------------------------------------------------------------------------- precision
def test_bf16_autocast_on_the_cpu_trains_close_to_fp32_and_saves_fp32(tiny, tmp_path):
    pairs = toy_pairs(24)
    runs = {p: train(_cfg(tiny("llama"), tmp_path / p, precision=p, max_steps=3), pairs[:16], pairs[16:])
            for p in ("fp32", "bf16")}
    losses = {p: [h["loss"] for h in r.history] for p, r in runs.items()}
    assert losses["bf16"] != losses["fp32"], "bf16 autocast changed nothing: it did not run"
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], atol=2e-2)
    saved = load_file(str(runs["bf16"].output_dir / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # master weights stay fp32
    fp32, bf16 = (_scores(RewardModel.load(r.output_dir), pairs) for r in runs.values())
    assert np.abs(bf16 - fp32).max() < 0.05 * max(1.0, np.abs(fp32).max())


def test_options_that_cannot_train_here_are_refused_with_the_fix(tiny, tmp_path):
    pairs = toy_pairs(8)
    with pytest.raises(TrainerError, match="fp16 needs a CUDA GPU.*--precision bf16"):
        train(_cfg(tiny("qwen3"), tmp_path / "o", precision="fp16", device="cpu"), pairs, pairs)
    with pytest.raises(TrainerError, match="precision 'fp8'"):
        _cfg(tiny("qwen3"), precision="fp8").check_options()
    with pytest.raises(TrainerError, match="not both"):
        _cfg(tiny("qwen3"), tokens_per_step=1000, grad_accum=4).check_options()
    with pytest.raises(TrainerError, match="more than the .* tokens"):
        train(_cfg(tiny("qwen3"), tmp_path / "o", tokens_per_step=10**9), pairs, [])
    from streams.cli import main

    out = CliRunner().invoke(main, ["train", "-d", str(tmp_path / "none.jsonl"), "--precision", "fp8"])
    assert out.exit_code == 2 and "fp8" in out.output  # click's choice check, before any work


def test_train_and_retrain_help_explain_the_large_model_options():
    from streams.cli import main

    for command in ("train", "retrain"):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        for option in ("--device", "--precision [fp32|bf16|fp16]", "--gradient-checkpointing", "--lora-r",
                       "--lora-alpha", "--lora-dropout", "--lora-targets", "--tokens-per-step"):
            assert option in text, (command, option)
    train_help = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "--resume-from" in train_help and "--checkpoint-every" in train_help and "torchrun" in train_help


# --------------------------------------------------------------------------- data-parallel ranks
def test_two_ranks_under_torchrun_train_like_one_process_and_only_rank_0_writes(tiny, tmp_path):
    """9 pairs in batches of 4: one step has a single pair, so one rank joins that all-reduce with
    a zero-weighted pass."""
    pairs = toy_pairs(13)
    spec = dict(base_model=str(tiny("qwen3")), batch_size=4, max_length=MAX_LENGTH, learning_rate=3e-3, max_steps=3,
                eval_every=0, checkpoint_every=2, progress=False, plot=False, seed=0, device="cpu")
    out = tmp_path / "ranks"
    out.mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec | {"out": str(out), "train_pairs": pairs[:9], "eval_pairs": pairs[9:]}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "distributed_train.py"), str(config)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the ranks ended with different weights"
    assert ranks[0]["metrics"]["world_size"] == 2 and ranks[0]["metrics"]["pairs_seen"] == 9
    assert (out / "rank-0" / "model.safetensors").exists() and (out / "rank-0" / "checkpoints" / "step-2").is_dir()
    assert not (out / "rank-1").exists(), "only rank 0 may write"

    single = train(TrainConfig(output_dir=str(tmp_path / "single"), **spec), pairs[:9], pairs[9:])
    np.testing.assert_allclose([h["loss"] for h in json.loads((out / "rank-0" / "history.json").read_text())],
                               [h["loss"] for h in single.history], rtol=1e-5)
    a, b = (load_file(str(d / "model.safetensors")) for d in (single.output_dir, out / "rank-0"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------ retrain and Jobs
def test_retrain_passes_every_training_option_through():
    from trainers.retrain import TRAIN_FIELDS, RetrainConfig, train_config

    shared = {f.name for f in fields(RetrainConfig)} & {f.name for f in fields(TrainConfig)}
    assert shared - {"eval_fraction"} == set(TRAIN_FIELDS)  # retrain splits its own holdout
    cfg = RetrainConfig(device="cpu", precision="bf16", gradient_checkpointing=True, lora_r=8, lora_alpha=32.0,
                        lora_dropout=0.1, lora_targets="all-linear", tokens_per_step=4096, max_steps=7, seed=3)
    tcfg = train_config(cfg, "out", "base", n_pairs=640, early_stopping=True)
    assert {name: getattr(tcfg, name) for name in TRAIN_FIELDS} == {name: getattr(cfg, name) for name in TRAIN_FIELDS}
    assert (tcfg.output_dir, tcfg.base_model) == ("out", "base")
    # Early stopping evaluates evals_per_epoch times an epoch of the job's pairs; without a validation slice
    # (early_stopping=False) the run trains every planned step.
    assert tcfg.eval_every == 640 // cfg.batch_size // cfg.evals_per_epoch
    plain = train_config(cfg, "out", "base", n_pairs=640)
    assert (plain.patience, plain.eval_every) == (0, 0)


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_the_retrain_job_asks_for_gpus_and_runs_torchrun_for_more_than_one(gpus):
    kv = pytest.importorskip("kubernetes_validate")
    job = job_manifest("prefstream-retrain-current-1", "current", {}, JobTemplate(gpus=gpus), ["--max-steps", "5"])
    kv.validate(job, "1.30.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    limits = c["resources"]["limits"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    if gpus == 0:
        assert c["args"] == ["retrain", "--role", "current", "--max-steps", "5"]
        assert "command" not in c and "nvidia.com/gpu" not in limits and "tolerations" not in pod
        assert job == job_manifest("prefstream-retrain-current-1", "current", {}, JobTemplate(), ["--max-steps", "5"])
        return
    assert limits["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    assert c["args"] == ["retrain", "--role", "current", "--device", "cuda", "--max-steps", "5"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if gpus == 1:
        assert "command" not in c and "/dev/shm" not in mounts
    else:
        assert c["command"] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "streams.cli"]
        assert "/dev/shm" in mounts
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]


def test_the_controller_hands_its_gpu_count_to_either_runner(tmp_path):
    from streams.runtime.controller import Controller
    from streams.settings import ControllerSettings, Settings

    assert ControllerSettings().job_gpus == 0
    local = Controller._make_runner(SimpleNamespace(settings=Settings(home=tmp_path),
                                                    csettings=ControllerSettings(job_gpus=2)))
    assert local.argv("gold") == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  "-m", "streams.cli", "retrain", "--role", "gold", "--device", "cuda"]
    assert LocalRunner(tmp_path).argv("gold", ["--max-steps", "3"]) == [
        sys.executable, "-m", "streams.cli", "retrain", "--role", "gold", "--max-steps", "3"]


def test_a_two_rank_retrain_job_publishes_once_and_prints_one_result(tmp_path):
    """The controller's local runner under torchrun (gloo ranks on the CPU): both ranks train, rank 0
    evaluates, publishes and prints the one RETRAIN_RESULT line the runner reads."""
    from streams.settings import Settings, child_env
    from trainers.storage.registry import ModelStore

    seed = tmp_path / "seed.jsonl"
    seed.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "extra"}) for p in toy_pairs(40)))
    env = child_env(Settings(home=tmp_path, models_dir=tmp_path / "models", shards_dir=tmp_path / "shards"))
    handle = LocalRunner(tmp_path / "logs", env=env | {"OMP_NUM_THREADS": "1"}, processes=2).submit(
        "current", {}, ["--seed-file", str(seed), "--max-steps", "4", "--max-length", "48", "--no-quantize",
                        "--no-announce", "--tolerance", "1"])
    handle.proc.wait(600)
    outcome = handle.outcome()
    log = handle.log.read_text()
    assert outcome.succeeded, log[-3000:]
    assert log.count("RETRAIN_RESULT") == 1 and [r["decision"] for r in outcome.result] == ["published", "published"]
    store = ModelStore(tmp_path / "models")
    assert sorted(v.version for v in store.list()) == sorted(r["version"] for r in outcome.result)  # no doubles
