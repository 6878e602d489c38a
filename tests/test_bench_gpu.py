"""`python -m bench.gpu --smoke`: the GPU bench's code paths on the CPU with tiny shapes, so the script
cannot rot where no GPU runs it. Its figures mean nothing; the checks are on what it computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT


def test_gpu_bench_smoke_runs_every_path_and_its_scores_agree(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "smoke" in result["device"] and result["peak_bf16_tflops"] is None  # no figure pretends to be measured
    shape = result["shapes"]["tiny"]
    assert shape["batched_vs_one_at_a_time_max_abs_diff_fp32"] < 1e-4
    for key in ("tokens_32", "tokens_64"):
        run = shape[key]
        for way in ("ours_bf16", "stream_bf16", "ours_fp32", "naive_fp32_max_length"):
            assert run[way]["pairs_per_s"] > 0 and run[way]["mfu"] is None, way
        # The naive way pads to max_length in input order; the scores must still be ours.
        assert run["naive_vs_ours_fp32_scores"]["decision_agreement"] == 1.0
        assert run["naive_vs_ours_fp32_scores"]["max_abs_diff"] < 1e-4
        # The stream scores the same pairs with the same bf16 model, grouped into its own micro-batches.
        assert run["stream_vs_bare_scores"]["pairs"] == run["ours_bf16"]["pairs"]
        assert run["stream_vs_bare_scores"]["max_abs_diff"] < 0.05
        assert run["bf16_vs_fp32_scores"]["max_abs_diff"] < 0.05
    assert result["long_context"]["response_kept"] and result["long_context"]["finite"]
    assert set(result["targets"]) == {"bf16_faster_than_fp32", "stream_over_bare"}  # the 0.6B shape did not run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is")
def test_gpu_bench_without_a_gpu_says_so_and_points_at_smoke():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "torch sees none" in proc.stderr and "--smoke" in proc.stderr
