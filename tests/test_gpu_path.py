"""The GPU serving path, proven on the CPU: device and dtype resolution, token-budget batching, the
host/device overlap pipeline, and the hot-swap warm-up. Tests that need CUDA run only where torch sees it.

Scores must not depend on how sequences are grouped: a decoder reads its reward at the last token
that is not padding, so a pair scores the same alone, in token-budget batches and through the overlap
pipeline (tiny Qwen3 and Llama models with the real special tokens, tests/tiny_models.py).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streams.exceptions import ConfigError
from streams.runtime.processors.scorer import Loaded, ModelSlot, Placement, Scorer, placement
from streams.settings import WorkerSettings
from tests.helpers import toy_pairs
from tests.tiny_models import build_tiny_decoder
from trainers.exceptions import DeviceError
from trainers.scoring import overlap
from trainers.scoring.devices import cpu_dtype_refusal, resolve_device, resolve_dtype
from trainers.scoring.formatting import length_sorted_batches
from trainers.scoring.model import RewardModel

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch sees none)")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """A tiny Qwen3 and a tiny Llama reward model directory, built once."""
    return {kind: build_tiny_decoder(kind, tmp_path_factory.mktemp(kind), seed=3) for kind in ("qwen3", "llama")}


def _uneven_pairs(n: int) -> list[dict]:
    pairs = toy_pairs(n, seed=4)
    for i, p in enumerate(pairs):  # lengths differ widely, so batches carry padding
        p["chosen"] += " and more" * ((7 * i) % 23)
        p["conversation"] = p["conversation"] * (1 + i % 3)
    return pairs


def _one_at_a_time(rm: RewardModel, pairs: list[dict]) -> np.ndarray:
    return np.array([np.concatenate(rm.score_pairs([p])) for p in pairs]).T.ravel()


# ---------------------------------------------------------------------------- device and dtype
def test_device_auto_follows_torch_and_cuda_without_a_gpu_is_refused():
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(DeviceError, match="not one of auto, cpu, cuda"):
            resolve_device(bad)
    if not CUDA:
        with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
            resolve_device("cuda:1")


def test_dtype_auto_is_fp32_on_cpu_and_half_precision_on_cpu_is_refused_by_services():
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("bf16", "cpu") == "bf16"  # the library does what it is asked
    with pytest.raises(DeviceError, match="dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    assert cpu_dtype_refusal("fp32", "cpu", "--dtype") is None and cpu_dtype_refusal("auto", "cpu", "--dtype") is None
    assert "--dtype to auto or fp32" in cpu_dtype_refusal("bf16", "cpu", "--dtype")
    assert cpu_dtype_refusal("fp16", "cuda:0", "--dtype") is None
    with pytest.raises(ConfigError, match="PREFSTREAM_WORKER_DTYPE=fp16 on the CPU"):
        placement("cpu", "fp16")
    assert placement("cpu", "auto") == Placement("cpu", "fp32", None)


@pytest.mark.skipif(CUDA, reason="checks the refusal where no GPU is")
def test_a_worker_asked_for_cuda_without_a_gpu_stops_at_start_saying_why(monkeypatch):
    from streams.runtime.worker import Worker
    from streams.settings import Settings

    monkeypatch.setenv("PREFSTREAM_WORKER_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="PREFSTREAM_WORKER_DEVICE.*torch sees no CUDA GPU"):
        Worker(Settings(), WorkerSettings())
    monkeypatch.setenv("PREFSTREAM_WORKER_DEVICE", "gpu")
    with pytest.raises(ValueError, match="device"):  # pydantic names the setting and its choices
        WorkerSettings()


def test_worker_settings_read_device_dtype_and_token_budget(monkeypatch):
    monkeypatch.setenv("PREFSTREAM_WORKER_DEVICE", "cpu")
    monkeypatch.setenv("PREFSTREAM_WORKER_DTYPE", "fp32")
    monkeypatch.setenv("PREFSTREAM_WORKER_TOKEN_BUDGET", "4096")
    ws = WorkerSettings()
    assert (ws.device, ws.dtype, ws.token_budget) == ("cpu", "fp32", 4096)
    assert placement(ws.device, ws.dtype, ws.token_budget) == Placement("cpu", "fp32", 4096)


def test_eval_takes_device_and_dtype_and_says_why_it_refuses_them(decoders, tmp_path):
    from click.testing import CliRunner

    from streams.cli import main
    from tests.helpers import write_jsonl

    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.",
                                                 "rejected": f"{2 * i + 1}."} for i in range(6)])
    base = ["eval", str(decoders["qwen3"]), "-d", str(data)]
    auto = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "auto")])
    fp32 = CliRunner().invoke(main, [*base, "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path / "cpu")])
    assert auto.exit_code == 0 and fp32.exit_code == 0, auto.output + fp32.output
    assert (tmp_path / "auto" / "report.json").read_text() != "" and "pairwise accuracy" in fp32.output
    refused = CliRunner().invoke(main, [*base, "--device", "cpu", "--dtype", "bf16"])
    assert refused.exit_code == 1 and "--dtype=bf16 on the CPU" in refused.output
    if not CUDA:
        no_gpu = CliRunner().invoke(main, [*base, "--device", "cuda"])
        assert no_gpu.exit_code == 1 and "torch sees no CUDA GPU" in no_gpu.output


# ---------------------------------------------------------------------------- token-budget batching
def test_token_budget_batches_hold_at_most_the_budget_in_padded_tokens():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(3, 400, 300)] + [900]  # one input longer than the budget
    for call_cost in (None, 8):
        batches = length_sorted_batches(lengths, 64, call_cost, token_budget=800)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= 64
            assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 800, b
        assert [len(b) for b in batches if 900 in [lengths[i] for i in b]] == [1]
    # Short inputs fill a batch up to the sequence cap; long ones make small batches.
    greedy = length_sorted_batches([10] * 100 + [200] * 10, 64, None, token_budget=800)
    assert [len(b) for b in greedy] == [4, 4, 4, 64, 34]  # the third: the last two long ones and two short


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_token_budget_batching_scores_like_one_at_a_time(kind, decoders):
    pairs = _uneven_pairs(12)
    rm = RewardModel.load(decoders[kind])
    alone = _one_at_a_time(rm, pairs)
    longest = max(len(e["input_ids"]) for e in rm.formatter.encode(
        [p["conversation"] for p in pairs], [p["chosen"] for p in pairs]))
    rm.batch_size, rm.call_cost, rm.token_budget = 256, None, 3 * longest  # GPU-style batches, within a budget
    sizes = [len(b) for b in rm.batches([len(e["input_ids"]) for e in rm.formatter.encode(
        [p["conversation"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])])]
    assert max(sizes) > 3 and min(sizes) < max(sizes), sizes  # the budget shaped the batches
    np.testing.assert_allclose(np.concatenate(rm.score_pairs(pairs)), alone, atol=1e-5)
    assert np.std(alone) > 0


# ---------------------------------------------------------------------------- overlap pipeline
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_overlap_pipeline_scores_like_the_plain_path_across_chunks(kind, decoders, monkeypatch):
    monkeypatch.setattr(overlap, "FIRST_CHUNK", 3)  # several chunks of 3, 6, 12 ... sequences
    monkeypatch.setattr(overlap, "MAX_CHUNK", 12)
    pairs = _uneven_pairs(20)
    plain = RewardModel.load(decoders[kind], overlap=False)
    piped = RewardModel.load(decoders[kind], overlap=True, token_budget=400)
    piped.call_cost = None
    assert piped.overlap and not piped.backend.pinned  # on the CPU nothing is page-locked
    np.testing.assert_allclose(np.concatenate(piped.score_pairs(pairs)), np.concatenate(plain.score_pairs(pairs)),
                               atol=1e-5)
    assert list(overlap.chunk_bounds(40, 3, 12)) == [(0, 3), (3, 9), (9, 21), (21, 33), (33, 40)]


def test_overlap_pipeline_serves_the_encoder_model_too():
    pairs = toy_pairs(30)
    torch.manual_seed(0)
    plain = RewardModel.default(max_length=64)
    torch.manual_seed(0)
    piped = RewardModel.default(max_length=64, overlap=True)
    np.testing.assert_allclose(np.concatenate(piped.score_pairs(pairs)), np.concatenate(plain.score_pairs(pairs)),
                               atol=1e-5)


def _host_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "score-host"]


def test_a_failure_on_either_side_of_the_pipeline_is_raised_and_leaves_no_thread(decoders, monkeypatch):
    rm = RewardModel.load(decoders["qwen3"], overlap=True)
    with pytest.raises(TypeError):  # the tokeniser's thread fails: the caller sees its error
        rm.score([[{"role": "user", "content": "hi"}]] * 2, ["fine", None])
    assert not _host_threads()
    monkeypatch.setattr(overlap, "FIRST_CHUNK", 2)
    calls = []

    def broken_launch(host):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(rm.backend, "launch", broken_launch)
    pairs = _uneven_pairs(40)
    with pytest.raises(RuntimeError, match="out of memory"):  # the device side fails: the host thread stops
        rm.score_pairs(pairs)
    assert calls == [1] and not _host_threads()


def test_cpu_defaults_stay_sequential_and_call_cost_batched(decoders):
    rm = RewardModel.load(decoders["qwen3"])
    assert (rm.overlap, rm.token_budget, rm.call_cost) == (False, None, 8)


# ---------------------------------------------------------------------------- hot-swap warm-up
def test_a_new_version_is_warmed_up_on_recent_pairs_before_it_is_parked(decoders):
    """The watcher thread pays the new model's first call; the swap itself only switches pointers."""
    calls: list[list[str]] = []

    def loader(record: dict) -> RewardModel:
        rm = RewardModel.load(decoders["llama"])
        real = rm.score_pairs

        def counted(pairs):
            calls.append([p["chosen"] for p in pairs])
            return real(pairs)

        rm.score_pairs = counted
        return rm

    old = RewardModel.load(decoders["qwen3"])
    current = ModelSlot("current", loader, serving=Loaded(old, "v0"))
    scorer = Scorer(current, ModelSlot("gold", loader))
    recent = _uneven_pairs(12)
    scorer.score(recent)
    current.offer({"version": "v1"})
    assert current.serving.version == "v0" and current.pending.version == "v1"
    assert calls == [[p["chosen"] for p in recent[-8:]]], "warmed up once, on the last pairs scored"
    assert current.pending.warmed_up_with == 8 and current.pending.warm_up_seconds > 0
    assert current.swap_if_ready() and current.serving.version == "v1"
    assert len(calls) == 1, "the swap itself scores nothing"
    assert current.swaps[-1].warm_up_seconds == current.serving.warm_up_seconds


def test_a_version_that_fails_its_warm_up_is_refused_and_the_old_one_serves(decoders):
    class Broken:
        def score_pairs(self, pairs):
            raise RuntimeError("kernel launch failed")

    slot = ModelSlot("current", lambda rec: Broken(), serving=Loaded(RewardModel.load(decoders["qwen3"]), "v0"))
    slot.offer({"version": "v1"})
    assert slot.pending is None and not slot.swap_if_ready() and slot.serving.version == "v0"
    assert "kernel launch failed" in slot.failures[-1]


# ---------------------------------------------------------------------------- on a GPU
@needs_cuda
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_on_the_gpu_scores_match_the_cpu_and_do_not_depend_on_batching(kind, decoders):
    pairs = _uneven_pairs(24)
    cpu = np.concatenate(RewardModel.load(decoders[kind]).score_pairs(pairs))
    gpu = RewardModel.load(decoders[kind], device="cuda", dtype="fp32", token_budget=256)
    assert gpu.overlap and gpu.backend.pinned
    np.testing.assert_allclose(np.concatenate(gpu.score_pairs(pairs)), cpu, atol=1e-4)
    np.testing.assert_allclose(_one_at_a_time(gpu, pairs), cpu, atol=1e-4)
    half = RewardModel.load(decoders[kind], device="cuda", dtype="auto")
    np.testing.assert_allclose(np.concatenate(half.score_pairs(pairs)), cpu, atol=0.1)
