"""A randomly initialised reward model of a given size, for throughput benchmarks only.

How fast a model scores depends on its architecture, not on its weights, and no larger reward model
can be downloaded here. The stream benchmark uses this to measure the stream's cost where the model
is much larger than the labeler's MiniLM encoder, as real reward models are (Skywork-Reward-V2's
smallest is 0.6B parameters). Its scores mean nothing: never serve it.

    python -m bench.random_model --size base OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import hh_pairs
from trainers.scoring.formatting import PAIR
from trainers.scoring.model import PREFSTREAM_CONFIG, default_base_path

# BERT-base's shape (110M parameters; 7.3-7.8x MiniLM-L6's time per pair, measured) on MiniLM's vocabulary.
SIZES = {"base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}}
VALIDATION = slice(1000, 1100)  # pairs outside the 1,000 the stream benchmark scores


def build(out: Path, size: str = "base", max_length: int = 256, seed: int = 0) -> Path:
    """Write config, tokenizer, weights and the checked fp32 ONNX file of a random ``size`` model to ``out``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from trainers.export.onnx import export

    base = default_base_path()
    config = BertConfig.from_pretrained(base, num_labels=1, architectures=["BertForSequenceClassification"], **SIZES[size])
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).eval().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / PREFSTREAM_CONFIG).write_text(json.dumps({"input_format": PAIR, "max_length": max_length}))
    # The export and torch-agreement check a trained model gets; fp32 only, the backend the MiniLM
    # bench serves too (its INT8 file is refused by that check).
    export(out, hh_pairs(VALIDATION.stop)[VALIDATION], quantize=False)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write the model to")
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per (conversation, response); 256 as the worker's bootstrap")
    args = ap.parse_args(argv)
    return build(args.out, args.size, args.max_length)


if __name__ == "__main__":
    print(main())
