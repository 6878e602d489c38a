"""Shared bench plumbing: the machine description, the shared data, and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def hh_pairs(n: int) -> list[dict]:
    if not HH.exists():
        raise SystemExit(f"shared data not present: {HH}; the benchmarks need ../shared/data")
    from trainers.training.data import read_pairs

    return read_pairs([HH])[:n]


def write_result(name: str, result: dict[str, Any], command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "git": _git_rev()} | result
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def _git_rev() -> str:
    """HEAD, with "+dirty" when tracked code differs from it (the figures then belong to a later commit)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                                 cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
    return f"{rev}+dirty" if changed else rev
