"""The docs state what the code has: every setting is in the operations configuration table, and
every repository path the docs name exists."""

from __future__ import annotations

import itertools
import re

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from streams import settings as settings_module
from tests.helpers import ROOT

TOPS = ("streams", "trainers", "schemas", "tests", "bench", "k8s", "docs", ".ci")
# A path is a top directory, then path characters (globs and {a,b} allowed), ending in a word character.
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOPS) + r")/[\w./*{},-]*[\w*}])")


def settings_classes() -> list[type[BaseSettings]]:
    return [c for c in vars(settings_module).values()
            if isinstance(c, type) and issubclass(c, BaseSettings) and c is not BaseSettings]


def environment_names(cls: type[BaseSettings]) -> list[set[str]]:
    """Per field, the environment variables that set it (any one of them)."""
    prefix = cls.model_config.get("env_prefix", "")
    out = []
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        names = set(alias.choices) if isinstance(alias, AliasChoices) else {f"{prefix}{name}".upper()}
        out.append({str(n) for n in names})
    return out


def configuration_table() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def expand(path: str) -> list[str]:
    """``chaos.{md,json}`` -> both names."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def named_paths(text: str) -> set[str]:
    return {p for m in PATH.finditer(text) for p in expand(m.group(1).rstrip("."))}


def test_every_setting_is_in_the_configuration_table():
    classes = settings_classes()
    assert {c.__name__ for c in classes} >= {"Settings", "WorkerSettings", "ControllerSettings", "ReviewSettings"}
    table = configuration_table()
    missing = sorted("/".join(sorted(names)) for cls in classes for names in environment_names(cls)
                     if not any(f"`{n}`" in table for n in names))
    assert not missing, f"add to the configuration table of docs/operations.md: {missing}"


def test_every_path_the_docs_name_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "k8s").rglob("*.md")),
            *sorted((ROOT / "k8s").rglob("*.yaml")), ROOT / "Makefile", ROOT / "Dockerfile", ROOT / "pyproject.toml"]
    missing = sorted(f"{doc.relative_to(ROOT)}: {path}" for doc in docs for path in named_paths(doc.read_text())
                     if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()))
    assert not missing, "the docs name paths that do not exist:\n" + "\n".join(missing)


def test_the_checks_see_what_they_look_for():
    assert named_paths("see `streams/kafka/topics.py`, bench/results/chaos.{md,json}.") == {
        "streams/kafka/topics.py", "bench/results/chaos.md", "bench/results/chaos.json"}
    assert named_paths("not ../shared/data or my-streams/x") == set()
    assert {"SCHEMA_REGISTRY_URL", "PREFSTREAM_SCHEMA_REGISTRY_URL"} in environment_names(settings_module.Settings)
    assert {"PREFSTREAM_WORKER_TAU"} in environment_names(settings_module.WorkerSettings)
