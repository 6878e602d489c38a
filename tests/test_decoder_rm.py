"""Decoder reward models (Qwen3, Llama 3.x) with tokenizers and chat templates like the real ones.

The pad id: decoder classifiers read the reward at the last token that is not config.pad_token_id,
so a pair must score the same alone and in a padded batch under every pad set-up of released
checkpoints (tests/tiny_models.PAD_CASES), with torch and with the ONNX export.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import toy_pairs
from tests.tiny_models import PAD_CASES, build_tiny_decoder
from trainers.scoring.formatting import CHAT, pad_batch
from trainers.scoring.model import RewardModel

CASES = [(kind, case) for kind, cases in PAD_CASES.items() for case in cases]
# The pad id each set-up must end with (resolve_pad_id's order: config, tokenizer, int EOS, 0).
EXPECTED_PAD = {
    ("qwen3", "agree"): "<|endoftext|>", ("qwen3", "no-config-pad"): "<|endoftext|>",
    ("llama", "agree"): "<|finetune_right_pad_id|>", ("llama", "no-tokenizer-pad"): "<|end_of_text|>",
    ("llama", "config-pad-added"): "<|reserved_special_token_0|>", ("llama", "eos-list"): "<|eot_id|>",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny model directory per (kind, pad case), built on first use."""
    built: dict[tuple[str, str], object] = {}

    def get(kind: str, case: str = "agree"):
        if (kind, case) not in built:
            built[kind, case] = build_tiny_decoder(kind, tmp_path_factory.mktemp(f"{kind}-{case}"), pad_case=case)
        return built[kind, case]

    return get


def _uneven_pairs(n: int = 8) -> list[dict]:
    pairs = toy_pairs(n)
    for i, p in enumerate(pairs):  # lengths differ, so every batch carries padding
        p["chosen"] += " extra" * (3 * i)
    return pairs


def _batched_and_alone(rm: RewardModel, pairs: list[dict], side: str) -> tuple[np.ndarray, np.ndarray]:
    rm.formatter.padding_side = side
    rm.batch_size, rm.call_cost = len(pairs) * 2, None  # one padded batch of all 2n sequences
    batched = np.concatenate(rm.score_pairs(pairs))
    alone = np.concatenate([np.concatenate(rm.score_pairs([p])) for p in pairs]).reshape(len(pairs), 2).T.ravel()
    return batched, alone


@pytest.mark.parametrize(("kind", "case"), CASES)
def test_the_pad_id_is_decided_once_for_config_tokenizer_and_padding(kind, case, models):
    path = models(kind, case)
    rm = RewardModel.load(path)
    vocab = len(rm.tokenizer)
    want = rm.tokenizer.convert_tokens_to_ids(EXPECTED_PAD[kind, case])
    assert rm.formatter.pad_id == rm.torch_model.config.pad_token_id == want
    assert rm.tokenizer.pad_token_id == want and len(rm.tokenizer) == vocab  # set, nothing added
    batch = rm.formatter.pad(rm.formatter.encode([[{"role": "user", "content": "hi"}]] * 2, ["a", "a longer answer"]))
    assert batch["input_ids"][0, -1] == want and batch["attention_mask"][0, -1] == 0


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("kind", "case"), CASES)
def test_a_pair_scores_the_same_alone_and_in_a_padded_batch(kind, case, side, models):
    rm = RewardModel.load(models(kind, case))
    batched, alone = _batched_and_alone(rm, _uneven_pairs(), side)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert np.std(alone) > 0


@pytest.mark.parametrize(("kind", "case"), [("qwen3", "no-config-pad"), ("llama", "no-tokenizer-pad"),
                                            ("llama", "config-pad-added"), ("llama", "agree")])
def test_the_onnx_export_pads_like_torch(kind, case, models, tmp_path):
    import shutil

    from trainers.export.onnx import export

    path = shutil.copytree(models(kind, case), tmp_path / "m")
    pairs = _uneven_pairs()
    report = export(path, pairs, quantize=False)
    assert report.agreement_fp32 == 1.0 and report.max_abs_diff_fp32 < 1e-4
    torch_batched, torch_alone = _batched_and_alone(RewardModel.load(path), pairs, "right")
    onnx = RewardModel.load(path, backend="onnx", onnx_file="model.onnx")
    for side in ("right", "left"):
        batched, alone = _batched_and_alone(onnx, pairs, side)
        np.testing.assert_allclose(batched, alone, atol=1e-5)
        np.testing.assert_allclose(batched, torch_alone, atol=1e-4)


def test_a_hand_built_mismatch_is_what_the_fix_removes(models):
    """Padding with another id than config.pad_token_id moves the reward: the bug this guards against."""
    rm = RewardModel.load(models("llama", "no-tokenizer-pad"))
    pairs = _uneven_pairs()
    good_batched, alone = _batched_and_alone(rm, pairs, "right")
    rm.formatter.pad_id = 0  # what `tokenizer.pad_token_id or 0` used to give
    bad_batched, _ = _batched_and_alone(rm, pairs, "right")
    assert np.abs(good_batched - alone).max() < 1e-5 < 1e-2 < np.abs(bad_batched - alone).max()


# ------------------------------------------------------------------------- formatting and truncation
def test_qwen3_renders_its_real_chat_structure(models):
    rm = RewardModel.load(models("qwen3"))
    assert rm.input_format == CHAT and rm.tokenizer.bos_token is None
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    ids = rm.formatter.encode([conv], ["4"])[0]["input_ids"]
    assert rm.tokenizer.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                                        "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")
    for special in ("<|im_start|>", "<|im_end|>"):  # one id each, not spelled out in bytes
        assert ids.count(rm.tokenizer.convert_tokens_to_ids(special)) == 3


def test_llama3_renders_its_real_chat_structure_with_one_bos(models):
    rm = RewardModel.load(models("llama"))
    ids = rm.formatter.encode([[{"role": "user", "content": "What is 2 + 2?"}]], ["4"])[0]["input_ids"]
    bos = rm.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1  # the template writes BOS; the tokenizer must not add another
    assert rm.tokenizer.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")


LONG_USER = {"role": "user", "content": "OLDEST " + "history " * 300 + "NEWEST question"}


@pytest.mark.parametrize(("kind", "system", "head"), [
    ("llama", "Be brief.", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                           "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"),
    ("llama", None, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"),
    ("llama", "rules " * 60, "<|begin_of_text|>"),  # a system turn over half the budget: only BOS is kept
    ("qwen3", "Be brief.", "<|im_start|>system\nBe brief.<|im_end|>\n"),
    ("qwen3", None, ""),  # Qwen3 has no BOS and writes no system turn unless given one
])
def test_left_truncation_keeps_bos_and_the_system_turn_and_cuts_after_them(kind, system, head, models):
    rm = RewardModel.load(models(kind), max_length=96)
    conv = ([{"role": "system", "content": system}] if system else []) + [LONG_USER]
    ids = rm.formatter.encode([conv], ["the final response"])[0]["input_ids"]
    text = rm.tokenizer.decode(ids)
    assert len(ids) == 96
    assert text.startswith(head) and "OLDEST" not in text
    assert text[len(head):].lstrip().startswith("history")  # the cut falls right after the head
    assert "NEWEST question" in text and "the final response" in text
    short = rm.formatter.encode([[{"role": "user", "content": "hi"}]], ["ok"])[0]["input_ids"]
    assert rm.tokenizer.decode(short).endswith("ok" + ("<|eot_id|>" if kind == "llama" else "<|im_end|>\n"))


# ------------------------------------------------------------------------- pooling, training, export
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_the_reward_is_read_at_the_last_real_token(kind, models):
    rm = RewardModel.load(models(kind))
    enc = rm.formatter.encode([[{"role": "user", "content": "hi"}]] * 2, ["ok", "a much longer answer here"])
    batch = {k: torch.from_numpy(v) for k, v in rm.formatter.pad(enc).items()}
    model = rm.torch_model
    with torch.no_grad():
        per_token = model.score(model.model(**batch).last_hidden_state)[..., 0]
        rewards = model(**batch).logits[:, 0]
    last = [len(e["input_ids"]) - 1 for e in enc]
    # The last real token is the template's end of turn (Qwen3 adds a newline after <|im_end|>).
    assert rm.tokenizer.decode(enc[0]["input_ids"][last[0]]) == ("<|eot_id|>" if kind == "llama" else "\n")
    torch.testing.assert_close(rewards, per_token[torch.arange(2), last])
    assert not torch.isclose(rewards[0], per_token[0, -1])  # the padded end would give another value


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_a_short_training_run_logs_the_loss_and_changes_every_parameter(kind, models, tmp_path):
    from trainers.training.train import TrainConfig, train

    pairs = toy_pairs(24)
    res = train(TrainConfig(base_model=str(models(kind, "no-config-pad" if kind == "qwen3" else "no-tokenizer-pad")),
                            output_dir=str(tmp_path / "out"), max_steps=3, batch_size=8, max_length=96,
                            learning_rate=1e-3, eval_every=0, progress=False, plot=False, seed=0), pairs[:16], pairs[16:])
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert res.metrics["unchanged_parameters"] == [] and res.metrics["trainable_parameters_changed"] > 0
    trained = RewardModel.load(res.output_dir)  # the saved model keeps the pad id it trained with
    assert trained.torch_model.config.pad_token_id == trained.formatter.pad_id == RewardModel.load(
        models(kind, "no-config-pad" if kind == "qwen3" else "no-tokenizer-pad")).formatter.pad_id


def test_pad_batch_pads_either_side():
    items = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8], "attention_mask": [1]}]
    right, left = pad_batch(items, 9), pad_batch(items, 9, "left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]] and right["attention_mask"][1].tolist() == [1, 0, 0]
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]] and left["attention_mask"][1].tolist() == [0, 0, 1]


def test_a_system_turn_that_would_cut_into_the_response_is_dropped_before_the_response_is(models):
    rm = RewardModel.load(models("llama"), max_length=96)
    response = " ".join(f"w{i}" for i in range(200))
    kept = rm.formatter._cut_responses(rm.tokenizer, [response], 96 - 32)[0]  # what the budget leaves of it
    conv = [{"role": "system", "content": "rules " * 5}, LONG_USER]  # 41 tokens: under half the budget
    text = rm.tokenizer.decode(rm.formatter.encode([conv], [response])[0]["input_ids"])
    assert text.startswith("<|begin_of_text|>") and "rules" not in text
    assert text.endswith(kept.strip() + "<|eot_id|>")
