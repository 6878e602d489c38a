"""Shared test helpers: running the CLI against the test stack, shared data, repeated checks."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-test.jsonl.gz"


def require_hh_rlhf() -> Path:
    if not HH_RLHF.exists():
        pytest.skip(f"shared data not present: {HH_RLHF} (a fresh clone without ../shared/data skips this)")
    return HH_RLHF


def hh_lines(limit: int) -> list[dict]:
    with gzip.open(require_hh_rlhf(), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(limit), fh, strict=False)]


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment for a subprocess that should see the same stack and topic prefix."""
    env = dict(os.environ)
    env.update({
        "PREFSTREAM_BOOTSTRAP": settings.bootstrap,
        "PREFSTREAM_REDIS_URL": settings.redis_url,
        "PREFSTREAM_HOME": str(settings.home),
        "PREFSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "PREFSTREAM_MODELS_DIR": str(settings.models_dir),
        "PREFSTREAM_SHARDS_DIR": str(settings.shards_dir),
    })
    env.pop("SCHEMA_REGISTRY_URL", None)
    return env


def run_cli(args: list[str], settings: Settings, *, check: bool = True, timeout: float = 300,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `prefstream ARGS` as a user would, in a subprocess, against ``settings``."""
    proc = subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], env=settings_env(settings), cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, input=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"prefstream {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """A separable toy set: chosen answers state the right sum politely, rejected ones refuse rudely."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append({"conversation": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                    "chosen": f"Happy to help: {a} plus {b} is {a + b}.",
                    "rejected": rng.choice(["No idea, go away.", "Figure it out yourself.", "Whatever, I refuse."]),
                    "extra": {}})
    return out


def assert_trained(result, min_accuracy: float = 0.9) -> None:
    """The one check for a training run: loss fell, every trainable parameter changed, accuracy reached."""
    m = result.metrics
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses[:3]} -> {losses[-3:]}"
    assert m["unchanged_parameters"] == [], f"parameters never updated: {m['unchanged_parameters']}"
    assert m["trainable_parameters_changed"] == m["trainable_parameters"] > 0
    assert m["eval_accuracy"] > min_accuracy, f"held-out accuracy {m['eval_accuracy']}"
    for name in ("model.safetensors", "metrics.json", "config.json", "curve.png"):
        assert (result.output_dir / name).exists(), f"{name} not written"
