"""Evaluation: readers for each benchmark format, and the metrics on known scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import run_cli, write_jsonl
from trainers.evaluation.evaluate import evaluate, is_style_trap, markdown_table, read_eval_items


class LookupScorer:
    """Scores a response by a table; the real model is exercised in test_reward_model and the CLI test."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, conversations, responses):
        return np.array([self.table.get(r, 0.0) for r in responses])


def test_readers_parse_each_format(tmp_path):
    files = {
        "json": [{"prompt": "q", "chosen": "a", "rejected": "b", "task_category": "math", "objectivity": "factual"}],
        "hh-rlhf": [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}],
        "rewardbench": [{"prompt": "q", "chosen": "a", "rejected": "b", "subset": "math-prm"}],
        "rmbench": [{"prompt": "q", "chosen": ["c1", "c2", "c3"], "rejected": ["r1", "r2", "r3"], "domain": "code"}],
        "judgebench": [{"question": "q", "response_A": "A", "response_B": "B", "label": "B>A"}],
        "best-of-n": [{"prompt": "q", "candidates": ["x", "y", "z"], "best": 1}],
    }
    for fmt, rows in files.items():
        items, skipped = read_eval_items(write_jsonl(tmp_path / f"{fmt}.jsonl", rows))
        assert len(items) == 1 and skipped == 0, fmt
    jb, _ = read_eval_items(tmp_path / "judgebench.jsonl")
    assert (jb[0]["chosen"], jb[0]["rejected"]) == ("B", "A")
    rb, _ = read_eval_items(tmp_path / "rewardbench.jsonl")
    assert rb[0]["category"] == "math-prm"
    hh, _ = read_eval_items(tmp_path / "hh-rlhf.jsonl")
    assert hh[0]["chosen"] == "hello" and hh[0]["conversation"] == [{"role": "user", "content": "hi"}]


def test_pairwise_accuracy_counts_ties_as_wrong_and_splits_by_category():
    items = [
        {"kind": "pair", "conversation": [], "chosen": "good", "rejected": "bad", "category": "math", "objectivity": "factual", "style_trap": False},
        {"kind": "pair", "conversation": [], "chosen": "tie1", "rejected": "tie2", "category": "math", "objectivity": "factual", "style_trap": False},
        {"kind": "pair", "conversation": [], "chosen": "bad", "rejected": "good", "category": "chat", "objectivity": "open-ended", "style_trap": True},
    ]
    report = evaluate(LookupScorer({"good": 1.0, "bad": -1.0, "tie1": 0.5, "tie2": 0.5}), items)
    assert report["pairwise_accuracy"] == pytest.approx(1 / 3)
    assert report["by_category"]["math"] == {"accuracy": 0.5, "n": 2}
    assert report["by_objectivity"]["open-ended"]["accuracy"] == 0.0
    assert report["style_trap_accuracy"] == 0.0 and report["style_trap_pairs"] == 1
    assert "| pairwise accuracy | 0.3333 | 3 |" in markdown_table(report)


def test_best_of_n_needs_the_best_strictly_first():
    items = [
        {"kind": "best_of_n", "conversation": [], "candidates": ["a", "b", "c"], "best": 1},
        {"kind": "best_of_n", "conversation": [], "candidates": ["a", "d", "c"], "best": 1},
        {"kind": "best_of_n", "conversation": [], "candidates": ["a", "e", "c"], "best": 1},
    ]
    report = evaluate(LookupScorer({"a": 0.0, "b": 2.0, "c": 1.0, "d": 1.0, "e": -1.0}), items)
    assert report["best_of_n_accuracy"] == pytest.approx(1 / 3)


def test_rmbench_matrix_easy_normal_hard():
    # Chosen styles score 1, 2, 3; rejected styles 1.5, 2.5, 3.5: chosen wins only against less styled rejects.
    table = {"c0": 1.0, "c1": 2.0, "c2": 3.0, "r0": 1.5, "r1": 2.5, "r2": 3.5}
    item = {"kind": "rmbench", "conversation": [], "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"]}
    rm = evaluate(LookupScorer(table), [item])["rmbench"]
    expected = np.array([[table[f"c{a}"] > table[f"r{b}"] for b in range(3)] for a in range(3)], dtype=float)
    assert rm["matrix"] == expected.tolist()
    assert rm["normal"] == 0.0 and rm["hard"] == 0.0 and rm["easy"] == 1.0


def test_style_trap_detection():
    assert is_style_trap("Paris.", "## Answer\n\n**Paris** is the capital of France, known for...")
    assert not is_style_trap("## Paris", "**Lyon** is a much longer answer than this one")
    assert not is_style_trap("A long plain answer here.", "short")


def test_unusable_lines_are_counted_not_fatal(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"},
                                              {"prompt": "q", "chosen": "a", "rejected": "b"}])
    items, skipped = read_eval_items(path)
    assert len(items) == 1 and skipped == 1


@pytest.mark.integration
def test_eval_cli_on_a_real_model_writes_json_and_markdown(settings, tmp_path):
    from trainers.scoring.model import RewardModel

    model = RewardModel.default(max_length=64).save(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(6)])
    out = run_cli(["eval", str(model), "-d", str(data), "--out", str(tmp_path / "rep")], settings)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["pairs"] == 6 and 0.0 <= report["pairwise_accuracy"] <= 1.0
    assert "| pairwise accuracy |" in out.stdout and (tmp_path / "rep" / "report.md").exists()
