"""The type checker `make lint` runs (pyproject.toml, [tool.mypy]) catches a wrong field name in a record.

Each case runs mypy, with the project's settings, on a few lines that use the typed records the way the
code does; the correct spelling must pass, so a broken configuration fails here too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TASK = """
from schemas.records import ReviewTask, SimilarPair

def task(pair, similar: list[SimilarPair]) -> ReviewTask:
    return {{"task_id": "t1", "pair": pair, "p": 0.3, "margin": -1.0, "model_version": "v1", "priority": 0.3,
            "reason": "mispredicted", "{similar}": similar, "expert": False, "created_at": 0}}
"""

NEIGHBOUR = """
import numpy as np
from streams.runtime.retrieval.index import NeighbourIndex

def closest(index: NeighbourIndex, query: np.ndarray) -> float:
    return index.search(query, 1)[0]["{field}"]
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One mypy cache for the module's runs: the project's modules are analysed once."""
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(tmp_path: Path, cache: Path, source: str) -> tuple[int, str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(source))
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(cache), str(snippet)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize(("template", "right", "wrong", "error"), [
    pytest.param(TASK, {"similar": "similar"}, {"similar": "similiar"}, "typeddict-unknown-key", id="review task"),
    pytest.param(NEIGHBOUR, {"field": "similarity"}, {"field": "simlarity"}, "typeddict-item", id="neighbour"),
])
def test_a_misspelt_record_field_fails_the_type_check(tmp_path, cache, template, right, wrong, error):
    rc, out = mypy(tmp_path, cache, template.format(**right))
    assert rc == 0, f"the correct spelling should pass:\n{out}"
    rc, out = mypy(tmp_path, cache, template.format(**wrong))
    assert rc == 1 and f"[{error}]" in out, out
