"""`prefstream eval --backend onnx` serves the best ONNX file a version has, and says the fix when none."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streams.cli import main
from tests.helpers import write_jsonl

PAIRS = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(12)]


def test_eval_onnx_uses_fp32_when_the_export_kept_no_int8(tmp_path):
    from schemas.pairs import validate_pair
    from trainers.export.onnx import export
    from trainers.scoring.model import ONNX_FP32, ONNX_INT8, RewardModel

    model = RewardModel.default(max_length=64).save(tmp_path / "m")
    export(model, [validate_pair(p) for p in PAIRS], quantize=False)
    assert (model / ONNX_FP32).exists() and not (model / ONNX_INT8).exists()
    data = write_jsonl(tmp_path / "eval.jsonl", PAIRS)
    torch_run = CliRunner().invoke(main, ["eval", str(model), "-d", str(data), "--out", str(tmp_path / "t")])
    onnx_run = CliRunner().invoke(main, ["eval", str(model), "-d", str(data), "--backend", "onnx",
                                         "--out", str(tmp_path / "o")])
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.output
    torch_report = json.loads((tmp_path / "t" / "report.json").read_text())
    onnx_report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert onnx_report["pairs"] == torch_report["pairs"] == len(PAIRS)
    assert onnx_report["pairwise_accuracy"] == torch_report["pairwise_accuracy"]
    # Calibration: a plain model directory has no manifest, so T = 1; the reliability table is printed.
    cal = torch_report["calibration"]
    assert cal["temperature"] == 1.0 and cal["pairs"] == len(PAIRS) and cal["ece"] == cal["ece_uncalibrated"]
    assert sum(b["count"] for b in cal["reliability"]) == len(PAIRS)
    assert "| confidence bin |" in torch_run.output and "ECE at the version's temperature 1" in torch_run.output


def test_eval_onnx_without_any_onnx_file_says_how_to_export(tmp_path):
    from trainers.scoring.model import RewardModel

    model = RewardModel.default(max_length=64).save(tmp_path / "m")
    data = write_jsonl(tmp_path / "eval.jsonl", PAIRS)
    result = CliRunner().invoke(main, ["eval", str(model), "-d", str(data), "--backend", "onnx"])
    assert result.exit_code == 1
    assert "prefstream export" in result.output and "--backend torch" in result.output
