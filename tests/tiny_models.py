"""Tiny randomly initialised decoder reward models (Qwen3, Llama), built locally: no download."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
)


def build_tiny_decoder(kind: str, out: Path, seed: int = 0, **sizes: int) -> Path:
    """A random decoder reward model with the packaged tokenizer and a chat template.

    ``sizes`` overrides the config (hidden_size, num_hidden_layers, ...): the GPU check in
    bench/gpu.py builds a larger one the same way.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
        Qwen3Config,
        Qwen3ForSequenceClassification,
    )

    from trainers.model import default_base_path

    tok = AutoTokenizer.from_pretrained(default_base_path())
    tok.chat_template = CHAT_TEMPLATE
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                  pad_token_id=tok.pad_token_id, use_cache=False) | sizes
    head_dim = common.pop("head_dim", 8)
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = Qwen3ForSequenceClassification(Qwen3Config(head_dim=head_dim, **common))
    elif kind == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(**common))
    else:
        raise ValueError(kind)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
