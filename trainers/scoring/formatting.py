"""Turning (conversation, response) into token ids the way each architecture expects.

- Encoders (BERT, MiniLM, DeBERTa, ...): a cross-encoder pair, segment A the conversation and
  segment B the response.
- Decoders (Qwen3, Llama, ...): the tokenizer's chat template with the response as the last
  assistant turn, which is how Skywork-Reward-V2 checkpoints are meant to be scored.

Truncation removes the oldest conversation tokens first, so the response (what is judged) is kept.
A response longer than the whole budget is cut at its end. In the chat format the template's head
(BOS and the system turn, see ``Formatter._head_tokens``) is kept too and the cut falls after it: a
decoder never saw a sequence that starts mid-turn without its BOS, and the system prompt is the
one piece of old context a reward model is trained to weigh.

Padding uses the one pad id ``RewardModel.load`` decided (``Formatter.pad_id``): decoder
classifiers read the reward at the last token that is not ``config.pad_token_id``, so padding with
any other id would score every shorter sequence of a batch at a padding position.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Keep at least this many conversation tokens when a response is very long: a reward without any
# context is meaningless.
MIN_CONTEXT_TOKENS = 32
# Inputs per tokenising thread. The Rust tokenizer releases the GIL, so a large call split over
# threads runs in parallel even where its own pool is off (the worker turns it off: its spinning
# threads took cores from the model). Measured on 2 cores, 2,000 HH-RLHF inputs.
TOKENIZE_CHUNK = 128
MAX_TOKENIZE_THREADS = 4
PAIR = "pair"
CHAT = "chat"
PADDING_SIDES = ("right", "left")


def conversation_text(conversation: Sequence[dict]) -> str:
    """Conversation as plain text for a cross-encoder's first segment."""
    return "\n".join(f"{turn['role']}: {turn['content']}" for turn in conversation)


def detect_input_format(model_type: str) -> str:
    """'pair' for encoder architectures, 'chat' for decoder-only ones."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return PAIR if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else CHAT


@dataclass
class Formatter:
    tokenizer: Any  # a Hugging Face tokenizer (transformers is untyped here)
    input_format: str
    max_length: int
    use_token_type_ids: bool
    pad_id: int
    # Right padding is what training and scoring use; left padding scores the same (decoders pool
    # the rightmost non-pad token, encoders the first) and is kept for callers that batch for generation.
    padding_side: str = "right"
    # One tokenizer per extra thread: a fast tokenizer sets its truncation state on the shared Rust
    # object on every call, so two threads must never call the same one.
    _copies: list[Any] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        from trainers.exceptions import ModelLoadError

        self.tokenizer.truncation_side = "left"
        if self.input_format == CHAT and getattr(self.tokenizer, "chat_template", None) is None:
            raise ModelLoadError("this decoder model's tokenizer has no chat_template; add one to tokenizer_config.json")
        if self.padding_side not in PADDING_SIDES:
            raise ModelLoadError(f"padding_side {self.padding_side!r} is not one of {', '.join(PADDING_SIDES)}")

    def _cut_responses(self, tok: Any, responses: Sequence[str], budget: int) -> list[str]:
        enc = tok(list(responses), add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, offsets in zip(responses, enc["offset_mapping"], strict=True):
            out.append(text[: offsets[budget - 1][1]] if len(offsets) > budget else text)
        return out

    def encode(self, conversations: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[dict[str, list[int]]]:
        """Token ids (unpadded) for each (conversation, response); large calls are split over threads."""
        threads = min(MAX_TOKENIZE_THREADS, _usable_cores(), len(responses) // TOKENIZE_CHUNK)
        if threads < 2:
            return self._encode(self.tokenizer, conversations, responses)
        while len(self._copies) < threads - 1:
            self._copies.append(copy.deepcopy(self.tokenizer))
        bounds = np.linspace(0, len(responses), threads + 1).astype(int).tolist()
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda tok, a, b: self._encode(tok, conversations[a:b], responses[a:b]),
                             [self.tokenizer, *self._copies], bounds[:-1], bounds[1:])
            return [x for part in parts for x in part]

    def _encode(self, tok: Any, conversations: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[dict[str, list[int]]]:
        if self.input_format == PAIR:
            responses = self._cut_responses(tok, responses, self.max_length - MIN_CONTEXT_TOKENS)
            enc = tok([conversation_text(c) for c in conversations], list(responses),
                      truncation="only_first", max_length=self.max_length)
        else:
            return self._encode_chat(tok, conversations, responses)
        keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.use_token_type_ids else [])
        return [{k: enc[k][i] for k in keys if k in enc} for i in range(len(enc["input_ids"]))]

    def _encode_chat(self, tok: Any, conversations: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[dict[str, list[int]]]:
        """Chat-template ids, cut from the left after the template's head (BOS and system turn)."""
        responses = self._cut_responses(tok, responses, self.max_length - MIN_CONTEXT_TOKENS)
        convs = [list(c) + [{"role": "assistant", "content": r}] for c, r in zip(conversations, responses, strict=True)]
        texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
        # The template already holds the special tokens (BOS etc.); do not add them twice. Untruncated:
        # the cut below needs the head's tokens, which the tokenizer's own left truncation would drop.
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for conv, text, ids, offsets in zip(convs, texts, enc["input_ids"], enc["offset_mapping"], strict=True):
            if len(ids) > self.max_length:
                keep = self._head_tokens(tok, conv, text, offsets)
                ids = ids[:keep] + ids[len(ids) - (self.max_length - keep):]
            out.append({"input_ids": list(ids), "attention_mask": [1] * len(ids)})
        return out

    def _head_tokens(self, tok: Any, conversation: list[dict], text: str, offsets: Sequence[tuple[int, int]]) -> int:
        """How many leading tokens of ``text`` left truncation keeps: BOS and the system turn.

        The system turn is what the template renders for the conversation's leading system messages
        (or for an empty system message, which is how Llama 3.1 renders its default date block); a
        rendering that is not a prefix of ``text`` (Qwen's template writes no system turn unless given
        one) is not used. The system turn is kept only where it takes at most half the budget and
        leaves room for the whole response turn; else only the BOS token is kept.
        """
        system = list(itertools.takewhile(lambda t: t["role"] == "system", conversation))
        heads = []
        try:
            heads.append(tok.apply_chat_template(system or [{"role": "system", "content": ""}], tokenize=False))
        except Exception:  # a template may refuse a system-only conversation (jinja raises many types)
            pass
        heads.append(getattr(tok, "bos_token", None) or "")
        # Tokens from the response's first character on: the judged turn, which must survive the cut.
        response_at = text.rfind(conversation[-1]["content"].strip())
        response_tokens = sum(1 for start, _ in offsets if start >= response_at) if response_at >= 0 else 0
        for head in heads:
            if head and text.startswith(head):
                keep = sum(1 for _, end in offsets if end <= len(head))
                if head is heads[-1] or (keep <= self.max_length // 2 and keep + response_tokens <= self.max_length):
                    return keep
        return 0

    def pad(self, items: Sequence[dict[str, list[int]]]) -> dict[str, np.ndarray]:
        """Pad a batch to its own longest member (dynamic padding) with the model's pad id."""
        return pad_batch(items, self.pad_id, self.padding_side)


def pad_batch(items: Sequence[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, np.ndarray]:
    """Arrays of ``items`` (token lists by input name) padded on ``side`` to the longest of them."""
    width = max(len(x["input_ids"]) for x in items)
    out: dict[str, np.ndarray] = {}
    for key in items[0]:
        fill = pad_id if key == "input_ids" else 0
        arr = np.full((len(items), width), fill, dtype=np.int64)
        for i, x in enumerate(items):
            if side == "left":
                arr[i, width - len(x[key]):] = x[key]
            else:
                arr[i, : len(x[key])] = x[key]
        out[key] = arr
    return out


def _usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS has one, e.g. a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def length_sorted_batches(lengths: Sequence[int], batch_size: int, call_cost: int | None = None,
                          token_budget: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` inputs of similar length, longest first.

    Without ``call_cost`` every batch is full. With it (a forward call's fixed cost, in tokens' worth
    of compute), a batch is cut short wherever the padding a full one would carry costs more than
    another call: dynamic programming over the cut points of the length-sorted inputs minimises
    (inputs x longest length) summed over batches, plus ``call_cost`` per batch. On CPU a forward
    pass costs about the same per token at 2 to 16 sequences (one alone a little more: the call cost),
    so short batches are nearly free while padding is not: micro-batches of 57 HH-RLHF pairs carried
    6.1% padding in full batches of 8, 0.9% cut.

    With ``token_budget`` a batch also holds at most that many padded tokens (inputs x its longest
    length), so an accelerator gets many short sequences per call and few long ones, in bounded
    memory; an input longer than the budget is a batch alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest = [lengths[i] for i in order]

    def fits(i: int, j: int) -> bool:  # inputs order[i:j] as one batch (longest[i] is its padded width)
        return j - i == 1 or token_budget is None or (j - i) * longest[i] <= token_budget

    if call_cost is None:
        batches, i = [], 0
        while i < len(order):
            j = i + 1
            while j < len(order) and j - i < batch_size and fits(i, j + 1):
                j += 1
            batches.append(order[i:j])
            i = j
        return batches
    # best[j]: least cost of the first j inputs; start[j]: where the last batch of that solution begins.
    best, start = [0] * (len(order) + 1), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        best[j], start[j] = min((best[i] + (j - i) * longest[i] + call_cost, i)
                                for i in range(max(0, j - batch_size), j) if fits(i, j))
    batches, j = [], len(order)
    while j:
        batches.append(order[start[j]: j])
        j = start[j]
    return batches[::-1]
