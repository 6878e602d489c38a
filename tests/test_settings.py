"""Service settings: paths derived from PREFSTREAM_HOME follow it."""

from __future__ import annotations

from pathlib import Path

from streams.settings import Settings, child_env


def test_two_homes_started_from_one_directory_share_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("PREFSTREAM_MODELS_DIR", "PREFSTREAM_SHARDS_DIR", "PREFSTREAM_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFSTREAM_HOME", "stack-a")
    a = Settings()
    b = Settings(home=tmp_path / "stack-b")
    assert a.models_dir == Path("stack-a") / "models" and a.shards_dir == Path("stack-a") / "shards"
    assert b.models_dir == tmp_path / "stack-b" / "models" and b.shards_dir == tmp_path / "stack-b" / "shards"
    mine = {a.models_dir.resolve(), a.shards_dir.resolve(), a.shards_root().resolve()}
    theirs = {b.models_dir.resolve(), b.shards_dir.resolve(), b.shards_root().resolve()}
    assert not mine & theirs
    assert a.shards_mirror_dir.parent == a.home and b.shards_mirror_dir.parent == b.home
    # A child process started with one stack's settings derives the same directories.
    monkeypatch.delenv("PREFSTREAM_HOME")
    for name, value in child_env(b, base={}).items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert (child.models_dir, child.shards_dir) == (b.models_dir, b.shards_dir)


def test_an_explicit_directory_wins_over_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFSTREAM_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("PREFSTREAM_SHARDS_DIR", raising=False)
    s = Settings()
    assert s.models_dir == tmp_path / "models"
    assert s.shards_dir == tmp_path / "home" / "shards"
    assert Settings(home=tmp_path / "other", shards_dir=tmp_path / "s").shards_dir == tmp_path / "s"
