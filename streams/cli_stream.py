"""CLI commands of the stream side: worker, dlq list|replay, shards."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from streams import topics
from streams.settings import ControllerSettings, ReviewSettings, WorkerSettings, get_settings, settings_help

console = Console(stderr=True)


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
    from streams.worker import run_worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if health_port is not None:
        overrides["health_port"] = health_port
    if no_shard_writer:
        overrides["shard_writer"] = False
    run_worker(get_settings(), WorkerSettings(**overrides))


@click.group("dlq")
def dlq() -> None:
    """Inspect and replay the dead-letter queue (prefs.dlq)."""


def _dead_letters(timeout: float) -> list[tuple[Any, dict]]:
    from streams.sdk import TopicReader

    settings = get_settings()
    with TopicReader(settings.topic(topics.DLQ), "DeadLetter", settings) as reader:
        return [(m, reader.codec.decode("DeadLetter", m.value(), m.headers())) for m in reader.messages(idle_timeout=timeout)]


@dlq.command("list")
@click.option("--reason", default=None, help="Only dead letters with this reason (e.g. invalid_json).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines (original bytes as latin-1 text).")
@click.option("--timeout", type=float, default=3.0, show_default=True)
def dlq_list(reason: str | None, as_json: bool, timeout: float) -> None:
    """List dead letters with their reason and source; ends with a count per reason."""
    counts: Counter[str] = Counter()
    for msg, dl in _dead_letters(timeout):
        if reason and dl["reason"] != reason:
            continue
        counts[dl["reason"]] += 1
        if as_json:
            out = {k: (v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in dl.items() if k != "original_headers"}
            click.echo(json.dumps(out | {"dlq_offset": msg.offset()}, ensure_ascii=False))
        else:
            click.echo(f"{msg.offset():>8} {dl['reason']:<20} {dl['source_topic']}[{dl['source_partition']}]@"
                       f"{dl['source_offset']}: {dl['detail'][:100]}")
    for r, n in counts.most_common():
        console.print(f"{r}: {n}")


@dlq.command("replay")
@click.option("--reason", default=None, help="Only replay dead letters with this reason.")
@click.option("--to", "target", default=None, help="Topic to replay into (default: each record's source topic).")
@click.option("--timeout", type=float, default=3.0, show_default=True)
def dlq_replay(reason: str | None, target: str | None, timeout: float) -> None:
    """Re-publish dead letters' original bytes (key, value, headers), e.g. after fixing a bug."""
    from confluent_kafka import Producer

    from streams.kafka_config import producer_config

    settings = get_settings()
    producer = Producer(producer_config(settings))
    n = 0
    for _, dl in _dead_letters(timeout):
        if reason and dl["reason"] != reason:
            continue
        producer.produce(target or dl["source_topic"], key=dl["original_key"], value=dl["original_value"],
                         headers=list(dl["original_headers"].items()))
        n += 1
    left = producer.flush(30)
    if left:
        raise click.ClickException(f"{left} replayed records were not acknowledged")
    console.print(f"replayed {n} dead letter(s)")


@click.command("shards")
def shards() -> None:
    """Show the shard manifest: rows per split and the shard files."""
    from pathlib import Path

    from streams.shard_writer import write_manifest

    root = Path(get_settings().shards_dir)
    if not root.exists():
        raise click.ClickException(f"no shards yet at {root} (PREFSTREAM_SHARDS_DIR)")
    manifest = write_manifest(root)
    click.echo(json.dumps({"totals": manifest["totals"], "files": len(manifest["shards"])}, indent=1))


@click.command("controller", epilog="Environment settings:\n\n" + settings_help(ControllerSettings))
@click.option("--log-level", default="INFO", show_default=True)
def controller(log_level: str) -> None:
    """Watch the shards and the live scores; retrain, gate, publish and roll back on its own.

    Triggers: PREFSTREAM_CONTROLLER_THRESHOLD_CURRENT / _THRESHOLD_GOLD new pairs, _INTERVAL_S, or
    drift. Jobs run as local processes (default) or Kubernetes Jobs (PREFSTREAM_CONTROLLER_RUNNER=kubernetes).
    Decisions are logged, counted on /metrics and appended to <models_dir>/controller-decisions.jsonl.
    """
    import signal

    from streams.announce import Announcer
    from streams.controller import Controller
    from streams.health import serve

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    import uvicorn

    from streams.review.app import create_app
    from streams.review.feeder import start

    settings, rs = get_settings(), ReviewSettings()
    app = create_app(settings, rs)
    if not len(app.state.book):
        console.print("[yellow]no annotator tokens configured (PREFSTREAM_REVIEW_TOKENS): every API call will get 401[/]")
    import threading

    from streams.review import aggregator

    feeder, _ = start(settings, app.state.queue)
    threading.Thread(target=aggregator.run, args=(settings, app.state.queue.r, feeder.stop), name="aggregator",
                     daemon=True).start()
    try:
        uvicorn.run(app, host=host or rs.host, port=port or rs.port, log_level="warning")
    finally:
        feeder.stop.set()


@click.command("annotate")
@click.option("--simulate", "n", type=int, required=True, help="How many simulated annotators to sign in.")
@click.option("--accuracy", type=float, default=0.9, show_default=True, help="Chance each verdict is right.")
@click.option("--truth", "truth_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="JSONL of the pairs with their known truth (metadata.truth = chosen|rejected).")
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
        raise click.ClickException(f"PREFSTREAM_REVIEW_TOKENS has {len(tokens)} annotator and {len(expert_tokens)} expert "
                                   f"tokens; --simulate {n} --experts {experts} needs more")
    stats = simulate(url, tokens, accuracy, load_truths(truth_file), max_tasks, idle, expert_tokens=expert_tokens)
    click.echo(json.dumps({"answered": stats.answered, "scored": stats.scored, "correct": stats.correct,
                           "per_annotator": stats.per_annotator}))


def register(main: click.Group) -> None:
    for cmd in (worker, dlq, shards, controller, review, annotate):
        main.add_command(cmd)
