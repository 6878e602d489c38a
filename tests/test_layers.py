"""Imports point one way: every package of streams/ imports only from the layers below it, and
trainers/ and schemas/ never import the layers above them. Read from the source (ast), so an import
inside a function counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from collections import defaultdict

from tests.helpers import ROOT

# Lowest first; units in one layer do not import each other.
LAYERS: list[set[str]] = [
    {"schemas"},
    {"trainers"},
    {"streams.exceptions"},
    {"streams.signing", "streams.history"},
    {"streams.review_budget"},
    {"streams.settings"},
    {"streams.keys"},
    {"streams.kafka"},
    {"streams.embedded", "streams.deploy"},
    {"streams.review"},
    {"streams.runtime"},
    {"streams.sdk"},
    {"streams.local"},
    {"streams.cli"},
    {"streams"},  # the package's own __init__
]
TOPS = ("streams", "trainers", "schemas")
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] != "streams" or len(parts) == 1 else ".".join(parts[:2])


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from streams import signing` imports streams.signing, not the package's __init__
            out.update(f"{node.module}.{a.name}" if node.module in TOPS else node.module for a in node.names)
    return {m for m in out if m.split(".")[0] in TOPS}


def unit_edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the modules that make the edge."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for top in TOPS:
        for path in sorted((ROOT / top).rglob("*.py")):
            mod = module_name(path)
            for target in imported(ast.parse(path.read_text(), str(path))):
                a, b = unit_of(mod), unit_of(target)
                if a != b:
                    edges[(a, b)].append(f"{mod} imports {target}")
    return edges


def test_every_unit_has_a_layer():
    units = {u for edge in unit_edges() for u in edge}
    assert not units - LAYER_OF.keys(), f"add these to LAYERS in {__file__}: {sorted(units - LAYER_OF.keys())}"


def test_imports_only_point_down():
    upward = [f"{why} ({a} is below {b})" for (a, b), whys in unit_edges().items()
              if LAYER_OF.get(a, -1) <= LAYER_OF.get(b, -1) for why in whys]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_the_checker_reads_every_import_form():
    tree = ast.parse("from streams import settings\nimport streams.runtime.metrics\nfrom trainers.retrain import x\n")
    assert imported(tree) == {"streams.settings", "streams.runtime.metrics", "trainers.retrain"}
    assert unit_of("streams.runtime.metrics") == "streams.runtime" and unit_of("trainers.storage.s3") == "trainers"
