"""Decontamination: stream pairs whose prompt is an evaluation set's are kept out of training.

The files the operator lists in PREFSTREAM_DECONTAMINATE (any layout `prefstream eval` reads:
RewardBench, RM-Bench, RMB, JudgeBench, ours) are read once at worker start into an in-memory index
of their prompts (the last user turn of each item): a set of normalised prompts for exact matches
and MinHash LSH bands (minhash.py) for light edits. A stream pair matches when its last user turn is
one of them, case and whitespace aside, or its estimated Jaccard similarity to one reaches the
threshold; the pipeline then scores it as usual and routes it nowhere (route ``dropped``, reason
``contaminated:<file stem>``), so it is never curated, reviewed, audited or written to a shard.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from schemas.pairs import prompt_text
from streams.exceptions import ConfigError
from streams.runtime.curation import minhash

REASON_PREFIX = "contaminated:"


def _exact(text: str) -> bytes:
    return hashlib.blake2b(minhash.normalise(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ContaminationIndex:
    """The prompts of the evaluation files, each remembered with the stem of its file."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.exact: dict[bytes, str] = {}
        self.bands: dict[str, list[int]] = defaultdict(list)
        self.sigs: list[np.ndarray] = []
        self.stems: list[str] = []
        self.files: dict[str, int] = {}  # file stem -> prompts indexed

    def __len__(self) -> int:
        return len(self.stems)

    def add(self, prompt: str, stem: str) -> None:
        self.exact.setdefault(_exact(prompt), stem)
        sig = minhash.signature(prompt)
        for b in minhash.band_keys(sig):
            self.bands[b].append(len(self.stems))
        self.sigs.append(sig)
        self.stems.append(stem)

    def match(self, pair: dict[str, Any]) -> str | None:
        """The stem of the evaluation file whose prompt this pair's last user turn is, or None."""
        if not self.stems:
            return None
        prompt = prompt_text(pair)
        if (stem := self.exact.get(_exact(prompt))) is not None:
            return stem
        sig = minhash.signature(prompt)
        candidates = {i for b in minhash.band_keys(sig) for i in self.bands.get(b, ())}
        best = max(((minhash.similarity(sig, self.sigs[i]), i) for i in candidates), default=(0.0, -1))
        return self.stems[best[1]] if best[0] >= self.threshold else None

    def reason(self, pair: dict[str, Any]) -> str | None:
        """``contaminated:<file stem>`` for a pair that matches, else None."""
        stem = self.match(pair)
        return None if stem is None else REASON_PREFIX + stem


def file_stem(path: Path) -> str:
    """The name a match is reported under: the file name without .gz, .jsonl or .json."""
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or path.name


def _prompts(path: Path) -> list[str]:
    from trainers.evaluation.benchmarks import read_eval_items

    items, _skipped = read_eval_items(path)
    return [prompt_text(item) for item in items if item.get("conversation")]


def load(spec: str | None, threshold: float) -> ContaminationIndex:
    """The index of the files in ``spec`` (comma-separated paths); ConfigError naming a file that cannot be read."""
    index = ContaminationIndex(threshold)
    for name in [part.strip() for part in (spec or "").split(",") if part.strip()]:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"PREFSTREAM_DECONTAMINATE lists {name!r}, which is not a file: give the path of an "
                              "evaluation file `prefstream eval` reads (RewardBench, RM-Bench, RMB, JudgeBench or "
                              "JSONL pairs), or take it out of the list")
        try:
            prompts = _prompts(path)
        except Exception as exc:  # any reader error is this file's: name it and stop the worker
            raise ConfigError(f"PREFSTREAM_DECONTAMINATE lists {name!r}, which could not be read as an evaluation "
                              f"file ({type(exc).__name__}: {exc}); fix the file (JSONL or a JSON array in a layout "
                              "`prefstream eval` reads), or take it out of the list") from exc
        if not prompts:
            raise ConfigError(f"PREFSTREAM_DECONTAMINATE lists {name!r}, which holds no prompt `prefstream eval` can "
                              "read; give an evaluation file in one of its layouts, or take it out of the list")
        stem = file_stem(path)
        for prompt in prompts:
            index.add(prompt, stem)
        index.files[stem] = len(prompts)
    return index
