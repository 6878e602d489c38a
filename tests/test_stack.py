"""Embedded runtime: start twice, crash recovery, taken ports, missing binaries (real processes)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from streams.embedded.process import free_port
from streams.embedded.stack import Stack
from streams.exceptions import BinaryNotFoundError, ConfigError, PortInUseError, StackError
from streams.kafka.admin import existing_topics
from streams.kafka.topics import TOPICS
from streams.settings import Settings
from tests.helpers import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def private(tmp_path) -> Settings:
    """A second, private stack on its own ports (the session stack keeps serving other tests)."""
    return Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0", home=tmp_path / "home")


def test_up_twice_is_safe_and_provisions_every_topic(private):
    try:
        up = run_cli(["stack", "up"], private)
        assert f"PREFSTREAM_BOOTSTRAP={private.bootstrap}" in up.stdout
        st = Stack(private)
        pids = (st.broker.pid(), st.redis.pid())
        assert all(pids)
        again = run_cli(["stack", "up"], private)
        assert "0 created" in again.stderr
        assert (st.broker.pid(), st.redis.pid()) == pids, "a second up must reuse the running servers"
        have = existing_topics(private)
        for spec in TOPICS:
            assert have[spec.name] == spec.partitions
        assert run_cli(["stack", "status"], private).returncode == 0
    finally:
        run_cli(["stack", "down"], private)
    assert Stack(private).broker.pid() is None and Stack(private).redis.pid() is None
    assert run_cli(["stack", "status"], private, check=False).returncode == 1


def test_down_after_crashed_broker_is_safe_and_up_recovers(private):
    st = Stack(private)
    st.up()
    try:
        broker_pid = st.broker.pid()
        os.kill(broker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while st.broker.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st.broker.pid() is None
        status = {s.name: s for s in st.status()}
        assert not status["broker"].answers and status["redis"].answers
        st.up()  # restarts the dead broker, keeps Redis
        assert st.broker.pid() not in (None, broker_pid)
    finally:
        result = run_cli(["stack", "down"], private)
    assert "broker: stopped" in result.stderr
    assert st.redis.pid() is None


def test_taken_port_gives_a_clear_error(private):
    host, port = private.bootstrap.split(":")
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        with pytest.raises(PortInUseError, match=f"port {port}.*PREFSTREAM_BOOTSTRAP"):
            Stack(private).up()
        result = run_cli(["stack", "up"], private, check=False)
    assert result.returncode == 1
    assert "in use by another process" in result.stderr and "Traceback" not in result.stderr
    Stack(private).down()


def test_server_dying_at_start_shows_its_log(private, tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'tansu: cannot open storage' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PREFSTREAM_TANSU_BIN", str(fake))
    with pytest.raises(StackError, match="exited at start with code 3(.|\n)*cannot open storage"):
        Stack(private).up()


def test_missing_binary_names_the_fix(private, monkeypatch):
    monkeypatch.setenv("PREFSTREAM_REDIS_BIN", "/nonexistent/redis-server")
    with pytest.raises(BinaryNotFoundError, match="pip install 'prefstream\\[embedded\\]'"):
        Stack(private).up()
    Stack(private).down()


def test_remote_bootstrap_is_refused_for_the_embedded_stack(tmp_path):
    with pytest.raises(ConfigError, match="PREFSTREAM_BOOTSTRAP"):
        Stack(Settings(bootstrap="kafka.example.com:9092", home=tmp_path))
