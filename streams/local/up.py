"""`prefstream up`: the whole system in the foreground with a live status, until Ctrl-C.

Starts the embedded stack (or uses the configured broker and Redis when they answer), the workers,
the review app and the controller. Ctrl-C (or SIGTERM) stops them in reverse order and leaves no
process behind. The next `up` resumes where this one stopped: the model store, shards, controller
state and review queue are on disk; committed offsets and topics too when the embedded broker is
durable (`up --durable`: its data is in the embedded object store) or outlives `up` (an external
one, or `prefstream stack up` run first: without --durable the embedded broker keeps messages in memory).
"""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import redis
from rich.console import Console
from rich.live import Live

from streams.embedded.stack import with_brokers
from streams.local.services import Deployment
from streams.local.status import ChangePrinter, Snapshot, collect, render
from streams.local.supervisor import describe_exit
from streams.settings import ReviewSettings, get_settings

console = Console(stderr=True, soft_wrap=True)  # log lines stay whole when not on a terminal


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_up(workers: int, review_port: int | None, no_controller: bool, refresh: float, plain: bool,
           durable: bool = False, brokers: int | None = None, every: float = 60.0) -> None:
    """Run everything in the foreground with a live status until Ctrl-C or SIGTERM (`prefstream up`)."""
    settings, rs = with_brokers(get_settings(), durable, brokers), ReviewSettings()
    tokens = rs.tokens.get_secret_value()
    if not tokens:
        token = secrets.token_urlsafe(16)
        tokens = f"you:{token}"
        console.print(f"annotator token for this run: [bold]{token}[/] (user 'you'; set PREFSTREAM_REVIEW_TOKENS "
                      "to choose your own)")
    dep = Deployment(settings, Path(settings.home) / "logs" / "up", workers=workers, review_host=rs.host,
                     review_port=review_port or rs.port, review_tokens=tokens, review_experts=rs.experts,
                     controller=not no_controller)
    signal.signal(signal.SIGTERM, _interrupt)
    # Explicitly, because Python keeps SIGINT ignored when it starts with it ignored, as every
    # command backgrounded by a non-interactive shell does (a test run under `make test &` did).
    signal.signal(signal.SIGINT, _interrupt)
    interactive = console.is_terminal and not plain
    try:
        t0 = time.monotonic()
        with console.status("starting the stack, workers, review app and controller ..."):
            dep.start()
        if dep.stack is not None and dep.stack.durable:
            console.print("started the embedded broker, its object store and Redis; they stop with `up`. The broker "
                          f"is durable (data in {dep.stack.object_store.data_dir}): the next `up` resumes where this "
                          "one stopped.")
        elif dep.stack is not None:
            console.print("started the embedded broker and Redis; they stop with `up`. The embedded broker keeps "
                          "messages in memory, so topics start empty next time (models, shards and the review queue "
                          "stay). Use `up --durable`, or run `prefstream stack up` first, to keep them between runs.")
        else:
            console.print(f"using the running broker at {settings.bootstrap} and Redis (left running at exit)")
        console.print(f"up in {time.monotonic() - t0:.0f} s · review app {dep.review_url} · logs {dep.log_dir} · "
                      "Ctrl-C stops everything")
        _watch(dep, refresh, interactive, every)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        console.print("stopping ...")
        codes = dep.stop()
        console.print("stopped: " + ", ".join(f"{k} {describe_exit(v)}" for k, v in codes.items()) +
                      ("; embedded stack stopped" if dep.stack is not None else ""))


def _watch(dep: Deployment, refresh: float, interactive: bool, every_s: float) -> None:
    r = redis.Redis.from_url(dep.settings.redis_url, socket_timeout=2)
    before: Snapshot | None = None

    def snap() -> Snapshot:
        return collect(dep.settings, dep.worker_metrics, dep.review_url, r)

    if interactive:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while True:
                dep.check()
                now = snap()
                live.update(render(now, before))
                before = now
                time.sleep(refresh)
    printer = ChangePrinter(every_s)
    while True:
        dep.check()
        now = snap()
        if (line := printer.line(now, before)) is not None:
            console.print(line, highlight=False, markup=False)
        before = now
        time.sleep(refresh)
