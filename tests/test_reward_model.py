"""Reward model core on real models: packaged MiniLM and tiny random Qwen3/Llama configs."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from tests.helpers import assert_trained, run_cli, toy_pairs, write_jsonl
from tests.tiny_models import build_tiny_decoder
from trainers.exceptions import DataError, ExportError, ModelLoadError, PickleCheckpointError
from trainers.export.onnx import export
from trainers.scoring.formatting import CHAT, PAIR, length_sorted_batches
from trainers.scoring.model import CPU_CALL_COST_TOKENS, RewardModel
from trainers.training.data import read_pairs
from trainers.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pairs = toy_pairs(120)
    cfg = TrainConfig(output_dir=str(tmp_path_factory.mktemp("toy") / "model"), max_steps=30, batch_size=8,
                      learning_rate=1e-4, max_length=64, eval_every=10, progress=False, seed=3)
    return train(cfg, pairs[:100], pairs[100:])


def test_tiny_training_run_learns_the_toy_set(trained):
    assert_trained(trained, min_accuracy=0.9)
    evals = [h for h in trained.history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [10, 20, 30]
    saved = json.loads((trained.output_dir / "metrics.json").read_text())
    assert saved["steps"] == 30 and saved["config"]["seed"] == 3


def test_training_is_deterministic_with_a_seed(tmp_path):
    pairs = toy_pairs(40)
    runs = [train(TrainConfig(output_dir=str(tmp_path / f"r{i}"), max_steps=4, batch_size=4, max_length=48,
                              eval_every=0, progress=False, plot=False, seed=7), pairs[:32], pairs[32:]) for i in range(2)]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def test_margin_and_centering_change_the_loss(tmp_path):
    pairs = toy_pairs(16)
    base = dict(max_steps=1, batch_size=16, max_length=48, eval_every=0, progress=False, plot=False, seed=1)
    plain = train(TrainConfig(output_dir=str(tmp_path / "a"), **base), pairs, pairs[:2]).history[0]["loss"]
    for p in pairs:
        p["extra"] = {"margin": 2.0}
    margin = train(TrainConfig(output_dir=str(tmp_path / "b"), **base), pairs, pairs[:2])
    centred = train(TrainConfig(output_dir=str(tmp_path / "c"), center_rewards_coefficient=1.0, **base), pairs, pairs[:2])
    assert margin.history[0]["loss"] > plain + 1.0  # -log sigmoid(d - 2) > -log sigmoid(d) + ~1.4 near d = 0
    assert centred.history[0]["loss"] > margin.history[0]["loss"]
    assert "classifier.bias" not in centred.metrics["unchanged_parameters"]


def test_freeze_layers_keeps_lower_layers_fixed(tmp_path):
    pairs = toy_pairs(16)
    res = train(TrainConfig(output_dir=str(tmp_path / "f"), max_steps=2, batch_size=8, max_length=48, freeze_layers=4,
                            eval_every=0, progress=False, plot=False), pairs, pairs[:4])
    assert res.metrics["unchanged_parameters"] == []
    from safetensors.torch import load_file

    from trainers.scoring.model import default_base_path

    base = load_file(str(default_base_path() / "model.safetensors"))
    new = load_file(str(res.output_dir / "model.safetensors"))
    assert torch.equal(new["bert.encoder.layer.0.attention.self.query.weight"], base["encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(new["bert.encoder.layer.5.attention.self.query.weight"], base["encoder.layer.5.attention.self.query.weight"])


def test_freeze_embeddings_keeps_only_the_token_embeddings_fixed(tmp_path):
    pairs = toy_pairs(16)
    res = train(TrainConfig(output_dir=str(tmp_path / "e"), max_steps=2, batch_size=8, max_length=48,
                            freeze_embeddings=True, eval_every=0, progress=False, plot=False), pairs, pairs[:4])
    assert res.metrics["unchanged_parameters"] == []
    from safetensors.torch import load_file

    from trainers.scoring.model import default_base_path

    base = load_file(str(default_base_path() / "model.safetensors"))
    new = load_file(str(res.output_dir / "model.safetensors"))
    assert torch.equal(new["bert.embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
    assert not torch.equal(new["bert.embeddings.position_embeddings.weight"], base["embeddings.position_embeddings.weight"])
    assert not torch.equal(new["bert.encoder.layer.0.attention.self.query.weight"], base["encoder.layer.0.attention.self.query.weight"])


def test_dropout_is_off_in_training_by_default(tmp_path):
    from trainers.training.train import disable_dropout

    rm = RewardModel.default(max_length=48)
    model = rm.torch_model.train()
    batch = {k: torch.from_numpy(v) for k, v in rm.formatter.pad(rm.formatter.encode(
        [[{"role": "user", "content": "What is two plus two?"}]] * 2, ["four", "five"])).items()}
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)  # dropout masks differ per pass
        disable_dropout(model)
        assert torch.equal(model(**batch).logits, model(**batch).logits)
    pairs = toy_pairs(8)
    base = dict(max_steps=1, batch_size=8, max_length=48, eval_every=0, progress=False, plot=False, seed=5)
    off = train(TrainConfig(output_dir=str(tmp_path / "off"), **base), pairs, pairs[:2]).history[0]["loss"]
    on = train(TrainConfig(output_dir=str(tmp_path / "on"), disable_dropout=False, **base), pairs, pairs[:2]).history[0]["loss"]
    assert off != on


def test_length_sorted_passes_give_the_whole_batch_rewards_and_gradients():
    """Training runs a micro-batch's sequences in length-sorted passes; each pair's two rewards must
    come back in place, with the gradient of one whole-batch pass."""
    from trainers.training.steps import _rewards
    from trainers.training.train import disable_dropout

    rm = RewardModel.default(max_length=96)
    model = rm.torch_model.train()
    disable_dropout(model)
    pairs = toy_pairs(6)
    pairs[1]["chosen"] = "a much longer chosen answer " * 8  # pair 1's two sequences land in different passes
    convs = [p["conversation"] for p in pairs]
    seqs = rm.formatter.encode(convs, [p["chosen"] for p in pairs]) + rm.formatter.encode(convs, [p["rejected"] for p in pairs])
    results = []
    for per_pass in (0, 4):
        model.zero_grad()
        rc, rr = _rewards(model, rm.formatter, seqs, per_pass, "cpu")
        (rc - 2 * rr).sum().backward()  # unequal weights: a chosen/rejected mix-up changes the gradient
        grad = model.get_input_embeddings().weight.grad.clone()
        results.append((rc.detach(), rr.detach(), grad))
    for whole, passes in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(passes, whole, atol=1e-5, rtol=1e-4)
    one_by_one = [rm.torch_model(**{k: torch.from_numpy(v) for k, v in rm.formatter.pad([s]).items()}).logits[0, 0].item()
                  for s in seqs[:6]]
    np.testing.assert_allclose(results[1][0].numpy(), one_by_one, atol=1e-5)


def test_training_data_reads_back_its_own_output_and_says_what_it_skipped(tmp_path):
    pairs = toy_pairs(3)
    pairs[1]["margin"] = 0.5
    read = read_pairs([write_jsonl(tmp_path / "a.jsonl", pairs)])
    assert read[1]["extra"] == {"margin": 0.5}
    tie = {"conversation": [{"role": "user", "content": "q"}], "chosen": "same", "rejected": "same"}
    again = write_jsonl(tmp_path / "b.jsonl", read + [tie])  # read_pairs output, 'extra' included
    skipped: list[str] = []
    assert [p["extra"] for p in read_pairs([again], skipped)] == [{}, {"margin": 0.5}, {}]
    assert len(skipped) == 1 and "b.jsonl:4" in skipped[0]
    only_tie = write_jsonl(tmp_path / "c.jsonl", [tie])
    with pytest.raises(DataError, match="all 1 records were unusable, the first: .*c.jsonl:1"):
        read_pairs([only_tie])


@pytest.mark.integration
def test_train_cli_reports_progress_lines_and_skips_in_a_log(settings, tmp_path):
    """Run as a retrain job or under kubectl logs (no terminal): progress comes as plain lines on stderr."""
    tie = {"conversation": [{"role": "user", "content": "q"}], "chosen": "same", "rejected": "same"}
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(20) + [tie])
    out = run_cli(["train", "-d", str(data), "--output-dir", str(tmp_path / "m"), "--max-steps", "4", "--batch-size", "4",
                   "--max-length", "32", "--eval-every", "2", "--no-plot"], settings)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "m")
    steps = [line for line in out.stderr.splitlines() if line.startswith("training step")]
    assert [line.split()[2] for line in steps] == ["1/4", "2/4", "3/4", "4/4"] and "acc" in steps[1]
    assert "skipped 1 unusable records" in out.stderr and "d.jsonl:21" in out.stderr


def test_warm_start_loads_the_trained_model(trained):
    rm = RewardModel.load(trained.output_dir)
    rc, rr = rm.score_pairs(toy_pairs(20, seed=99))
    assert np.mean(rc > rr) > 0.9
    assert rm.input_format == PAIR and rm.max_length == 64


def test_truncation_keeps_the_response_and_cuts_old_context():
    rm = RewardModel.default(max_length=64)
    conv = [{"role": "user", "content": "OLDEST " + "filler " * 200 + "NEWEST question"}]
    ids = rm.formatter.encode([conv], ["the final response"])[0]["input_ids"]
    text = rm.tokenizer.decode(ids)
    assert len(ids) == 64
    assert "the final response" in text and "newest question" in text and "oldest" not in text
    long_resp = rm.formatter.encode([conv], ["word " * 500])[0]["input_ids"]
    assert len(long_resp) == 64


@pytest.mark.parametrize("kind", ["minilm", "qwen3"])
def test_large_calls_tokenise_on_threads_each_with_its_own_tokenizer_and_the_same_ids(kind, tmp_path, monkeypatch):
    from trainers.scoring import formatting

    rm = RewardModel.default(max_length=64) if kind == "minilm" else RewardModel.load(build_tiny_decoder(kind, tmp_path / kind))
    pairs = toy_pairs(300)
    for i, p in enumerate(pairs):  # some are cut on the conversation side, some on the response side
        if i % 7 == 0:
            p["conversation"] = [{"role": "user", "content": "old context " * 60 + p["conversation"][-1]["content"]}]
        if i % 11 == 0:
            p["chosen"] += " a long answer" * 60
    convs, responses = [p["conversation"] for p in pairs], [p["chosen"] for p in pairs]
    fmt = rm.formatter
    want = fmt._encode(fmt.tokenizer, convs, responses)
    used: list[tuple[int, int]] = []
    inner = fmt._encode
    monkeypatch.setattr(fmt, "_encode", lambda tok, c, r: used.append((id(tok), len(r))) or inner(tok, c, r))
    monkeypatch.setattr(formatting, "_usable_cores", lambda: 4)  # the threaded path even on one core
    assert fmt.encode(convs, responses) == want
    assert len(used) == 2 and len({tok for tok, _ in used}) == 2, used  # 300 inputs: two threads, two tokenizers
    assert sum(n for _, n in used) == len(pairs)
    used.clear()
    fmt.encode(convs[:100], responses[:100])  # a small call stays on the calling thread
    assert used == [(id(fmt.tokenizer), 100)]


def _padded_cost(lengths: list[int], batches: list[list[int]], call_cost: int) -> int:
    return sum(len(b) * max(lengths[i] for i in b) + call_cost for b in batches)


@pytest.mark.parametrize("seed", range(5))
def test_batches_cut_where_padding_costs_more_than_a_call(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(5, 300, size=11)]
    full = length_sorted_batches(lengths, 4)
    cut = length_sorted_batches(lengths, 4, call_cost=8)
    for batches in (full, cut):
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each input exactly once
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True) and all(len(b) <= 4 for b in batches)
    assert [len(b) for b in full] == [4, 4, 3]
    # Cut points of the sorted lengths, tried exhaustively: the cuts chosen cost the least.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    every = []
    for mask in itertools.product((0, 1), repeat=len(order) - 1):
        bounds = [0] + [i + 1 for i, m in enumerate(mask) if m] + [len(order)]
        parts = [order[a:b] for a, b in itertools.pairwise(bounds)]
        if all(len(part) <= 4 for part in parts):
            every.append(_padded_cost(lengths, parts, 8))
    assert _padded_cost(lengths, cut, 8) == min(every) <= _padded_cost(lengths, full, 8)


def test_a_long_input_does_not_pad_a_batch_of_short_ones():
    lengths = [200, 12, 11, 10, 12, 9, 200, 11]
    assert length_sorted_batches(lengths, 8, call_cost=8) == [[0, 6], [1, 4, 2, 7, 3, 5]]
    assert length_sorted_batches(lengths, 8) == [[0, 6, 1, 4, 2, 7, 3, 5]]


@pytest.mark.parametrize("call_cost", [None, CPU_CALL_COST_TOKENS], ids=["full-batches", "cut-batches"])
def test_dynamic_padding_gives_the_same_scores_as_one_by_one(call_cost):
    rm = RewardModel.default(max_length=128, batch_size=4)
    rm.call_cost = call_cost
    pairs = toy_pairs(10)
    pairs[3]["chosen"] = "a much longer answer " * 10
    convs = [p["conversation"] for p in pairs]
    batched = rm.score(convs, [p["chosen"] for p in pairs])
    single = np.array([rm.score([c], [p["chosen"]])[0] for c, p in zip(convs, pairs, strict=True)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_the_in_memory_onnx_twin_scores_like_torch_and_leaves_torch_intact():
    """What a worker serves before any version exists: the bootstrap exported to ONNX in memory."""
    from trainers.export.onnx import onnx_twin

    pairs = toy_pairs(12)
    pairs[5]["chosen"] = "a much longer answer " * 12
    rm = RewardModel.default(max_length=96, attn_implementation="eager")
    before = np.stack(rm.score_pairs(pairs))
    twin = onnx_twin(rm, threads=1)
    assert twin.backend.path is None and twin.torch_model is None
    np.testing.assert_allclose(np.stack(twin.score_pairs(pairs)), before, atol=1e-4)
    # The export must not leave the torch model in training mode (dropout on): same scores as before.
    np.testing.assert_allclose(np.stack(rm.score_pairs(pairs)), before, atol=1e-6)
    with pytest.raises(ExportError, match="eager"):
        onnx_twin(RewardModel.default(max_length=32, attn_implementation="sdpa"))


def test_bf16_backend_scores_close_to_fp32():
    pairs = toy_pairs(8)
    torch.manual_seed(0)
    fp32 = RewardModel.default(max_length=64).score_pairs(pairs)[0]
    bf16 = RewardModel.default(max_length=64, dtype="bf16").score_pairs(pairs)[0]
    np.testing.assert_allclose(fp32, bf16, atol=0.1)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_tiny_decoder_scores_through_chat_template_and_onnx(kind, tmp_path):
    path = build_tiny_decoder(kind, tmp_path / kind)
    rm = RewardModel.load(path)
    assert rm.input_format == CHAT
    ids = rm.formatter.encode([[{"role": "user", "content": "hi there"}]], ["the answer"])[0]["input_ids"]
    decoded = rm.tokenizer.decode(ids)
    assert decoded.index("user") < decoded.index("assistant") < decoded.index("answer")
    pairs = toy_pairs(24)
    for i, p in enumerate(pairs):  # different lengths, so batches are padded
        p["chosen"] += " extra" * i
    rc, _ = rm.score_pairs(pairs)
    assert np.isfinite(rc).all() and np.std(rc) > 0
    report = export(path, pairs, quantize=False)
    assert report.agreement_fp32 >= 0.995 and report.max_abs_diff_fp32 < 1e-4
    onnx_rc, _ = RewardModel.load(path, backend="onnx", onnx_file="model.onnx").score_pairs(pairs)
    np.testing.assert_allclose(onnx_rc, rc, atol=1e-4)


def test_minilm_export_int8_agrees_on_a_trained_model(trained, tmp_path):
    import shutil

    model = shutil.copytree(trained.output_dir, tmp_path / "m")
    pairs = toy_pairs(100, seed=5)
    report = export(model, pairs, quantize=True)
    assert report.agreement_fp32 >= 0.995 and report.agreement_int8 >= 0.995
    assert (model / "model.int8.onnx").stat().st_size < (model / "model.onnx").stat().st_size / 2


def test_smoothquant_keeps_fp32_results_and_cuts_int8_error(trained, tmp_path):
    import logging
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from trainers.export import smoothquant
    from trainers.scoring.model import OnnxBackend

    logging.getLogger().setLevel(logging.ERROR)
    model = shutil.copytree(trained.output_dir, tmp_path / "m")
    pairs = toy_pairs(40, seed=5)
    export(model, pairs, quantize=False)
    graph = onnx.load(str(model / "model.onnx"))
    groups = smoothquant.matmul_groups(graph)
    # MiniLM-L6: per layer one group of Q/K/V (same input), attention output, FFN in, FFN out.
    assert (len(groups), sum(map(len, groups.values()))) == (24, 36)
    rm = RewardModel.load(model, backend="onnx", onnx_file="model.onnx")

    def calibrate(backend):
        rm.backend = backend
        rm.score_pairs(pairs)

    smoothed = smoothquant.smooth(graph, smoothquant.channel_absmax(graph, calibrate, list(groups)))
    assert sum(n.op_type == "Mul" and n.name.startswith("smoothquant_") for n in smoothed.graph.node) == 24
    rewards = {}
    for tag, g in (("plain", graph), ("smoothed", smoothed)):
        onnx.save(g, str(tmp_path / f"{tag}.onnx"))
        quantize_dynamic(str(tmp_path / f"{tag}.onnx"), str(tmp_path / f"{tag}8.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=True)
        for f in (f"{tag}.onnx", f"{tag}8.onnx"):
            rm.backend = OnnxBackend(tmp_path / f)
            rewards[f] = np.concatenate(rm.score_pairs(pairs))
    ref = rewards["plain.onnx"]
    np.testing.assert_allclose(rewards["smoothed.onnx"], ref, atol=1e-4)  # exact in fp32
    plain_err, smoothed_err = (np.abs(rewards[f] - ref).mean() for f in ("plain8.onnx", "smoothed8.onnx"))
    assert smoothed_err < 0.85 * plain_err, (smoothed_err, plain_err)


def test_export_fails_loudly_and_leaves_no_file(trained, tmp_path):
    import shutil

    model = shutil.copytree(trained.output_dir, tmp_path / "m")
    with pytest.raises(ExportError, match="agrees with torch on only"):
        export(model, toy_pairs(10), quantize=False, min_agreement=1.01)
    assert not (model / "model.onnx").exists()


def test_pickle_checkpoint_is_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="arbitrary code"):
        RewardModel.load(d)


def test_missing_and_wrong_models_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        RewardModel.load(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="backend"):
        RewardModel.load(tmp_path, backend="tensorrt")
    with pytest.raises(ModelLoadError, match="prefstream export"):
        RewardModel.default(backend="onnx")


def test_training_device_is_resolved_or_refused_with_the_fix():
    from trainers.exceptions import TrainerError
    from trainers.training.train import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainerError, match="cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainerError, match="use device cpu"):
            resolve_device("cuda:0")
