"""Benchmarks read in their official layouts, scored against hand-computed values.

Every response starts with its reward ("2.5|text"), so the expected numbers follow by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import toy_pairs, write_jsonl
from trainers.evaluation.evaluate import evaluate, markdown_table, read_eval_items, read_regression_pairs
from trainers.exceptions import DataError


class PrefixScorer:
    """The reward written at the start of each response."""

    def score(self, conversations, responses):
        assert len(conversations) == len(responses)
        return np.array([float(r.split("|", 1)[0]) for r in responses])


def _rb(i: int, subset: str, chosen: float, rejected: float) -> dict:
    # RewardBench's filtered split, as exported from allenai/reward-bench: these columns, in this order.
    return {"prompt": f"question {i}", "chosen": f"{chosen}|answer {i}a", "chosen_model": "gpt-4",
            "rejected": f"{rejected}|answer {i}b", "rejected_model": "llama", "subset": subset, "id": i}


REWARDBENCH_ROWS = [
    _rb(0, "alpacaeval-easy", 1, 0), _rb(1, "alpacaeval-easy", 0, 1),   # 0.5
    _rb(2, "mt-bench-easy", 1, 0),                                      # 1.0
    _rb(3, "llmbar-natural", 1, 0), _rb(4, "mt-bench-hard", 0.5, 0.5),  # 1.0, 0.0 (a tie is wrong)
    _rb(5, "donotanswer", 1, 0), _rb(6, "xstest-should-refuse", 0, 1),  # 1.0, 0.0
    _rb(7, "math-prm", 1, 0), _rb(8, "hep-python", 0, 1),               # 1.0, 0.0
    _rb(9, "my-own-subset", 1, 0),                                      # in no section
]


def test_rewardbench_reports_its_section_weighted_score(tmp_path):
    items, skipped = read_eval_items(write_jsonl(tmp_path / "rb.jsonl", REWARDBENCH_ROWS))
    assert skipped == 0 and len(items) == 10
    report = evaluate(PrefixScorer(), items)
    rb = report["rewardbench"]
    # Sections weight subsets by RewardBench's fixed example counts, not by the rows in the file.
    chat = (0.5 * 100 + 1.0 * 28) / (100 + 28)
    chat_hard = (1.0 * 100 + 0.0 * 37) / (100 + 37)
    safety = (1.0 * 136 + 0.0 * 250) / (136 + 250)
    reasoning = (1.0 * 984 + 0.0 * 164) / (984 + 164)
    assert rb["sections"] == pytest.approx({"Chat": chat, "Chat Hard": chat_hard, "Safety": safety, "Reasoning": reasoning})
    assert rb["score"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    assert rb["missing_sections"] == [] and rb["unmapped_subsets"] == ["my-own-subset"]
    assert report["pairwise_accuracy"] == pytest.approx(6 / 10)  # every row, unweighted
    assert report["by_category"]["alpacaeval-easy"] == {"accuracy": 0.5, "n": 2}
    assert f"| RewardBench score | {rb['score']:.4f} |" in markdown_table(report)


def test_rewardbench_with_missing_sections_scores_only_those_present(tmp_path):
    items, _ = read_eval_items(write_jsonl(tmp_path / "rb.jsonl", REWARDBENCH_ROWS[:3]))
    rb = evaluate(PrefixScorer(), items)["rewardbench"]
    assert rb["sections"] == pytest.approx({"Chat": 78 / 128}) and rb["score"] == pytest.approx(78 / 128)
    assert rb["missing_sections"] == ["Chat Hard", "Safety", "Reasoning"]


def test_rmbench_json_array_gives_its_3x3_matrix_overall_and_by_domain(tmp_path):
    # RM-Bench's total_dataset.json: one JSON array; styles concise, detailed, detailed markdown.
    records = [
        {"id": "chat/1", "prompt": "q1", "chosen": ["1|c0", "2|c1", "3|c2"], "rejected": ["1.5|r0", "2.5|r1", "3.5|r2"],
         "domain": "chat"},
        {"id": "math/1", "prompt": "q2", "chosen": ["5|c0", "5|c1", "5|c2"], "rejected": ["0|r0", "0|r1", "0|r2"],
         "domain": "math"},
    ]
    path = tmp_path / "total_dataset.json"
    path.write_text(json.dumps(records, indent=2))
    items, skipped = read_eval_items(path)
    assert skipped == 0 and [it["kind"] for it in items] == ["rmbench", "rmbench"]
    rm = evaluate(PrefixScorer(), items)["rmbench"]
    # chat: chosen beats rejected only when less styled: [[0,0,0],[1,0,0],[1,1,0]]; math: all ones.
    assert rm["matrix"] == [[0.5, 0.5, 0.5], [1.0, 0.5, 0.5], [1.0, 1.0, 0.5]]
    assert (rm["easy"], rm["normal"], rm["hard"]) == (1.0, 0.5, 0.5)
    assert rm["average"] == pytest.approx(6 / 9) and rm["items"] == 2
    assert (rm["by_domain"]["chat"]["easy"], rm["by_domain"]["chat"]["hard"]) == (1.0, 0.0)
    assert rm["by_domain"]["math"]["normal"] == 1.0


def _rmb_bon(uid: str, best: float, losers: list[float], path: str) -> dict:
    return {"bon_uid": uid, "category_path": path,
            "conversation_input": [{"content": f"prompt {uid}", "language": "English", "role": "user"}],
            "bon_best": {"answer": f"{best}|best {uid}", "llm_name": "m0"},
            "loser_list": [{"answer": f"{s}|loser {uid}{j}", "llm_name": f"m{j + 1}"} for j, s in enumerate(losers)]}


def test_rmb_best_of_n_needs_the_best_strictly_above_every_loser(tmp_path):
    records = [_rmb_bon("a", 3, [1, 2], "Helpfulness/Code/Python"),
               _rmb_bon("b", 2, [2, 1], "Helpfulness/Code/Python"),   # a tie with a loser: wrong
               _rmb_bon("c", 1, [0, 5], "Harmlessness/S1/Violent")]
    path = tmp_path / "bon.json"
    path.write_text(json.dumps(records))
    items, _ = read_eval_items(path)
    assert items[0]["conversation"] == [{"role": "user", "content": "prompt a"}] and items[0]["best"] == 0
    report = evaluate(PrefixScorer(), items)
    assert report["best_of_n_accuracy"] == pytest.approx(1 / 3) and report["best_of_n_items"] == 3
    assert report["best_of_n_by_category"] == {"Harmlessness/S1/Violent": {"accuracy": 0.0, "n": 1},
                                               "Helpfulness/Code/Python": {"accuracy": 0.5, "n": 2}}


def test_rmb_pairwise_and_judgebench_layouts(tmp_path):
    rmb = [{"pair_uid": "p1", "category_path": "Helpfulness/Chat", "conversation_input": [{"role": "user", "content": "hi"}],
            "chosen": {"answer": "2|good", "llm_name": "a"}, "reject": {"answer": "1|bad", "llm_name": "b"}}]
    judge = [  # JudgeBench's JSONL: the label says which of A and B is right
        {"pair_id": "j1", "original_id": "o1", "source": "mmlu-pro-math", "question": "q1", "response_model": "gpt-4o",
         "response_A": "2|A", "response_B": "1|B", "label": "A>B"},
        {"pair_id": "j2", "original_id": "o2", "source": "livecodebench", "question": "q2", "response_model": "gpt-4o",
         "response_A": "3|A", "response_B": "1|B", "label": "B>A"},
    ]
    items, skipped = read_eval_items(write_jsonl(tmp_path / "rmb.jsonl", rmb))
    items2, skipped2 = read_eval_items(write_jsonl(tmp_path / "judge.jsonl", judge))
    assert skipped == skipped2 == 0
    report = evaluate(PrefixScorer(), items + items2)
    assert report["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert report["by_category"] == {"Helpfulness/Chat": {"accuracy": 1.0, "n": 1},
                                     "coding": {"accuracy": 0.0, "n": 1}, "knowledge": {"accuracy": 1.0, "n": 1}}


def test_regression_pairs_come_from_every_layout(tmp_path):
    rb = read_regression_pairs(write_jsonl(tmp_path / "rb.jsonl", REWARDBENCH_ROWS))
    assert len(rb) == 10 and rb[0]["task_category"] == "alpacaeval-easy" and rb[0]["chosen"] == "1|answer 0a"
    rm = tmp_path / "rm.json"
    rm.write_text(json.dumps([{"prompt": "q", "chosen": ["1|a", "2|b", "3|c"], "rejected": ["0|x", "0|y", "3|c"],
                               "domain": "code"}]))
    pairs = read_regression_pairs(rm)
    assert len(pairs) == 8 and {p["task_category"] for p in pairs} == {"code"}  # 9 comparisons, one identical
    bon = tmp_path / "bon.json"
    bon.write_text(json.dumps([_rmb_bon("a", 3, [1, 2], "Helpfulness/Code")]))
    assert [(p["chosen"], p["rejected"]) for p in read_regression_pairs(bon)] == [("3|best a", "1|loser a0"),
                                                                                 ("3|best a", "2|loser a1")]
    ours = read_regression_pairs(write_jsonl(tmp_path / "ours.jsonl", toy_pairs(3)))  # 'extra' and all
    assert len(ours) == 3 and ours[0]["task_category"] is None
    with pytest.raises(DataError, match="no usable pair"):
        read_regression_pairs(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}]))


def test_retrain_gates_on_a_rewardbench_regression_file(tmp_path, monkeypatch):
    """The rows used to be dropped unseen (their extra columns are not pair fields)."""
    from trainers.retrain import RetrainConfig, run_retrain
    from trainers.training import train as train_module

    seen: list[dict] = []

    class Stop(Exception):
        pass

    def fake_train(cfg, pairs, eval_pairs):
        seen.extend(eval_pairs)
        raise Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    regression = write_jsonl(tmp_path / "rb.jsonl", REWARDBENCH_ROWS)
    cfg = RetrainConfig(models_dir=str(tmp_path / "m"), shards_dir=str(tmp_path / "s"), regression_file=str(regression),
                        min_pairs=1, max_steps=1, max_length=32, quantize=False)
    with pytest.raises(Stop):
        run_retrain(cfg, None, pairs=toy_pairs(4), holdout=[])
    assert len(seen) == 10 and seen[7]["task_category"] == "math-prm"
