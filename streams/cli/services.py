"""The long-running services: `prefstream worker`, `controller`, `review`, and `annotate` (simulated annotators)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from streams.cli.common import console, setup_logging
from streams.exceptions import ConfigError
from streams.settings import ControllerSettings, ReviewSettings, WorkerSettings, get_settings, settings_help


@click.command("worker", epilog="Environment settings:\n\n" + settings_help(WorkerSettings))
@click.option("--health-port", type=int, default=None, help="Port of /healthz, /readyz, /metrics (default 8081; 0 = off).")
@click.option("--no-shard-writer", is_flag=True, help="Do not run the shard writer in this process.")
@click.option("--log-level", default="INFO", show_default=True)
def worker(health_port: int | None, no_shard_writer: bool, log_level: str) -> None:
    """Run the stream processors: ingest, score, label, route (and the shard writer).

    Reads prefs.raw, writes prefs.scored, prefs.review, prefs.curated, prefs.dlq in one Kafka
    transaction per micro-batch. Start several to share the partitions; Ctrl-C stops cleanly.
    Every setting is an environment variable, listed below.
    """
    from streams.runtime.worker import run_worker

    setup_logging(log_level)
    overrides: dict[str, Any] = {}
    if health_port is not None:
        overrides["health_port"] = health_port
    if no_shard_writer:
        overrides["shard_writer"] = False
    run_worker(get_settings(), WorkerSettings(**overrides))


@click.command("controller", epilog="Environment settings:\n\n" + settings_help(ControllerSettings))
@click.option("--log-level", default="INFO", show_default=True)
def controller(log_level: str) -> None:
    """Watch the shards and the live scores; retrain, gate, publish and roll back on its own.

    Triggers: PREFSTREAM_CONTROLLER_THRESHOLD_CURRENT / _THRESHOLD_GOLD new pairs, _INTERVAL_S, or
    drift. Jobs run as local processes (default) or Kubernetes Jobs (PREFSTREAM_CONTROLLER_RUNNER=kubernetes).
    Decisions are logged, counted on /metrics and appended to <models_dir>/controller-decisions.jsonl.
    """
    import signal

    from streams.kafka.announce import Announcer
    from streams.runtime.controller import Controller
    from streams.runtime.health import serve

    setup_logging(log_level)
    settings, csettings = get_settings(), ControllerSettings()
    ctl = Controller(settings, csettings, announce=Announcer(settings))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: ctl.stop.set())
    server = serve(csettings.health_host, csettings.health_port, alive=lambda: not ctl.stop.is_set(),
                   ready=lambda: True) if csettings.health_port else None
    try:
        ctl.run()
    finally:
        if server is not None:
            server.shutdown()


@click.command("review", epilog="Environment settings:\n\n" + settings_help(ReviewSettings))
@click.option("--host", default=None, help="Address to listen on (default PREFSTREAM_REVIEW_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default PREFSTREAM_REVIEW_PORT or 8080).")
def review(host: str | None, port: int | None) -> None:
    """Serve the annotator web app, feed it from prefs.review, aggregate verdicts.

    Annotators sign in with personal tokens from PREFSTREAM_REVIEW_TOKENS ('name:token,...');
    experts are listed in PREFSTREAM_REVIEW_EXPERTS. API docs at /docs.
    """
    import threading

    import uvicorn

    from streams.review import aggregator
    from streams.review.app import create_app
    from streams.review.feeder import start

    settings, rs = get_settings(), ReviewSettings()
    app = create_app(settings, rs)
    if not len(app.state.book):
        console.print("[yellow]no annotator tokens configured (PREFSTREAM_REVIEW_TOKENS): every API call will get 401[/]")

    feeder, _ = start(settings, app.state.queue)
    threading.Thread(target=aggregator.run, args=(settings, app.state.queue.redis, feeder.stop),
                     kwargs={"retention_s": rs.retention_s}, name="aggregator",
                     daemon=True).start()
    try:
        uvicorn.run(app, host=host or rs.host, port=port or rs.port, log_level="warning", proxy_headers=True,
                    forwarded_allow_ips=rs.forwarded_allow_ips)
    finally:
        feeder.stop.set()


@click.command("annotate")
@click.option("--simulate", "n", type=int, required=True, help="How many simulated annotators to sign in.")
@click.option("--accuracy", type=float, default=0.9, show_default=True, help="Chance each verdict is right.")
@click.option("--truth", "truth_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="JSONL of the pairs with their known truth (metadata.truth = chosen|rejected|tie|both_bad; "
                   "optional metadata.strength = slightly|clearly|much).")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The review app.")
@click.option("--max-tasks", type=int, default=None, help="Stop after this many verdicts.")
@click.option("--idle", type=float, default=5.0, show_default=True, help="Stop after this many seconds without a task.")
@click.option("--experts", type=int, default=0, show_default=True,
              help="Also run this many simulated experts (the annotators named in PREFSTREAM_REVIEW_EXPERTS).")
def annotate(n: int, accuracy: float, truth_file: Path, url: str, max_tasks: int | None, idle: float, experts: int) -> None:
    """Simulated annotators answering review tasks through the HTTP API, like real users.

    Uses the first N non-expert tokens of PREFSTREAM_REVIEW_TOKENS (and --experts expert tokens).
    """
    from streams.review.simulate import load_truths, simulate

    rs = ReviewSettings()
    expert_names = {e.strip() for e in rs.experts.split(",") if e.strip()}
    pairs = [item.split(":", 1) for item in rs.tokens.get_secret_value().split(",") if ":" in item]
    tokens = [t for name, t in pairs if name not in expert_names][:n]
    expert_tokens = [t for name, t in pairs if name in expert_names][:experts]
    if len(tokens) < n or len(expert_tokens) < experts:
        raise ConfigError(f"PREFSTREAM_REVIEW_TOKENS has {len(tokens)} annotator and {len(expert_tokens)} expert "
                                   f"tokens; --simulate {n} --experts {experts} needs more")
    stats = simulate(url, tokens, accuracy, load_truths(truth_file), max_tasks, idle, expert_tokens=expert_tokens)
    click.echo(json.dumps({"answered": stats.answered, "scored": stats.scored, "correct": stats.correct,
                           "per_annotator": stats.per_annotator}))



COMMANDS = (worker, controller, review, annotate)
