"""Tiny randomly initialised decoder reward models (Qwen3, Llama 3.x) with tokenizers like the real ones.

No download: each tokenizer is a byte-level BPE trained here on a few hundred strings, carrying the
real special tokens (appended after the ordinary vocabulary, as in the real files, so id 0 is an
ordinary token) and the published chat template, simplified only where tool calling is concerned.
The pad set-ups are the ones met in released checkpoints (``PAD_CASES``), because a reward model
reads its score at the last token that is not ``config.pad_token_id``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

# Qwen3's published template (Qwen/Qwen3-8B tokenizer_config.json) without the tools/tool_call
# branches: no BOS; a system turn only when given; the assistant turn after the last user query gets
# an (empty) <think></think> block, as Qwen3 renders its final answer.
QWEN3_CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Llama 3.1's published template (meta-llama/Llama-3.1-8B-Instruct) without the tools and ipython
# branches: BOS, then always a system turn carrying the knowledge-cutoff and date lines.
LLAMA3_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_ADDED = ["<think>", "</think>"]  # ordinary added tokens in Qwen3, not special ones
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]

# Pad set-ups of released checkpoints: (tokenizer pad, config pad, config eos), by token name;
# a list eos is Llama-3.1-Instruct's [end_of_text, eom, eot].
PAD_CASES: dict[str, dict[str, tuple[str | None, str | None, Any]]] = {
    "qwen3": {
        "agree": ("<|endoftext|>", "<|endoftext|>", "<|im_end|>"),        # Skywork-Reward-V2-Qwen3
        "no-config-pad": ("<|endoftext|>", None, "<|im_end|>"),           # Qwen3 base/instruct configs
    },
    "llama": {
        "agree": ("<|finetune_right_pad_id|>", "<|finetune_right_pad_id|>", "<|end_of_text|>"),
        "no-tokenizer-pad": (None, None, "<|end_of_text|>"),              # Llama-3.1-8B base
        "config-pad-added": (None, "<|reserved_special_token_0|>", "<|end_of_text|>"),
        "eos-list": (None, None, ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),  # Llama-3.1-8B-Instruct
    },
}


def _corpus() -> list[str]:
    """A few hundred strings of chat-like English and code-ish text for the tiny BPE."""
    subjects = ["the cat", "a model", "my friend", "the reward", "this answer", "the weather", "Paris", "a student"]
    verbs = ["is", "was", "seems", "looks", "stays", "becomes"]
    objects = ["very helpful.", "quite wrong!", "about 42 tokens long", "in the kitchen?", "safe and correct",
               "written in markdown: **bold** and - lists", "2 + 2 = 4", "def f(x): return x * 2"]
    out = [f"{s} {v} {o}" for s in subjects for v in verbs for o in objects]
    out += ["Hello, how are you today?", "I am fine, thank you.", "What is 2 + 2?", "Say hello", "history " * 8,
            "user", "assistant", "system", "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
            "You are a helpful assistant.", "OLDEST NEWEST question answer response final kept"]
    return out


@functools.cache
def _bpe_json(kind: str) -> str:
    """The trained tokenizer as JSON (cached: training is the same every time)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if kind == "qwen3":
        tok.add_special_tokens(QWEN3_SPECIAL)
        tok.add_tokens(QWEN3_ADDED)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.add_special_tokens(LLAMA3_SPECIAL)
        # Llama 3's tokenizer.json adds BOS when asked for special tokens; the formatter never asks
        # (the template writes BOS), which this keeps honest.
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                          special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]),
        ])
    return tok.to_str()


def build_tokenizer(kind: str, pad_case: str = "agree") -> Any:
    """A PreTrainedTokenizerFast like Qwen3's or Llama 3.1's, with ``pad_case``'s pad token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if kind not in PAD_CASES:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(PAD_CASES)}")
    tok_pad = PAD_CASES[kind][pad_case][0]
    names = ({"eos_token": "<|im_end|>"} if kind == "qwen3"
             else {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>" if pad_case == "eos-list" else "<|end_of_text|>"})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json(kind)), pad_token=tok_pad,
                                  chat_template=QWEN3_CHAT_TEMPLATE if kind == "qwen3" else LLAMA3_CHAT_TEMPLATE,
                                  model_max_length=131072, clean_up_tokenization_spaces=False, **names)
    return tok


def build_tiny_decoder(kind: str, out: Path, seed: int = 0, pad_case: str = "agree", **sizes: int) -> Path:
    """A random decoder reward model (hidden 32, 2 layers unless ``sizes`` says otherwise) and its tokenizer.

    ``sizes`` overrides the config (hidden_size, num_hidden_layers, ...): the GPU check in
    bench/gpu.py builds a larger one the same way.
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        Qwen3Config,
        Qwen3ForSequenceClassification,
    )

    tok = build_tokenizer(kind, pad_case)
    _, cfg_pad, cfg_eos = PAD_CASES[kind][pad_case]
    ids = tok.convert_tokens_to_ids
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                  pad_token_id=ids(cfg_pad) if cfg_pad else None,
                  eos_token_id=[ids(t) for t in cfg_eos] if isinstance(cfg_eos, list) else ids(cfg_eos),
                  bos_token_id=None if kind == "qwen3" else ids("<|begin_of_text|>"), use_cache=False) | sizes
    head_dim = common.pop("head_dim", 8)
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = Qwen3ForSequenceClassification(Qwen3Config(head_dim=head_dim, **common))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(head_dim=head_dim, **common))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
