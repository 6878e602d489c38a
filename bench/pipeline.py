"""End-to-end stream throughput vs the bare scorer, latency at half the maximum rate, 1 -> 2 workers.

All on a private embedded stack. "Bare scorer" is the model alone (the bootstrap MiniLM exactly as
the worker serves it, on ONNX Runtime, our default batching, all pairs in one call so it sorts them
all by length) scoring the same pairs in this process; end to end adds Kafka, ingest, dedupe,
labels (one more MiniLM pass over the last user turn), routing, retrieval and the transactional
commit, in micro-batches as they arrive. The bare scorer runs before and after each end-to-end run
(this shared machine's speed drifts), and the reported ratio is the median over the runs.

``--gold DIR`` runs the scorer as docs/design.md describes it, with a gold reward model beside the current
one (published to the bench's model store and announced, so the worker loads it as in production);
the bare scorer then scores with both models too. Without a gold model the router can send nothing
to silver or flipped, so only this mode exercises the whole curation path.

``--current DIR`` serves DIR instead of the bootstrap, the same way. With the default MiniLM reward
model the labeler's own MiniLM pass is a sizeable share of the work (the ``label`` stage in the
result's stage seconds); ``bench.random_model`` makes a BERT-base-sized model, several times
MiniLM's cost per pair, to measure the stream where the model is the bottleneck, as it is with real
reward models.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from bench.common import hh_pairs, write_result
from trainers.exceptions import RegistryError


def _settings(base, home: Path):
    return base.model_copy(update={"topic_prefix": f"b{uuid.uuid4().hex[:8]}.", "shards_dir": home / uuid.uuid4().hex})


def _stage_seconds(metrics_text: str) -> dict[str, float]:
    """The worker's prefstream_stage_seconds sums: where its batches spent their time."""
    found = re.findall(r'prefstream_stage_seconds_sum\{stage="(\w+)"\} ([0-9.e+-]+)', metrics_text)
    return {stage: round(float(v), 2) for stage, v in found}


def _e2e(settings, pairs, workers: int, versions: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Wall seconds from the first produce to the last pair scored, and the first worker's stage seconds."""
    from streams.kafka.admin import ensure_topics
    from streams.sdk import PreferenceProducer
    from tests.helpers import WorkerProcess, wait_for_scored

    ensure_topics(settings)
    _announce(settings, versions)
    # Two workers get their share of the cores each (with all cores each they thrash: 0.56x of one). One
    # worker keeps its default, as the bare scorer does: ONNX Runtime pins its threads to the cores only
    # when their number is left to it, so an explicit count would run the worker unpinned against a
    # pinned anchor.
    env = {"PREFSTREAM_WORKER_THREADS": str(max(1, (os.cpu_count() or 1) // workers))} if workers > 1 else {}
    procs = [WorkerProcess(settings, worker_id=f"bench{i}", extra_env=env).start() for i in range(workers)]
    try:
        time.sleep(8)  # let the group settle so both workers own partitions before the clock starts
        t = time.perf_counter()
        with PreferenceProducer(settings) as producer:
            ids = {producer.send(p) for p in pairs}
        wait_for_scored(settings, ids, timeout=900)
        return time.perf_counter() - t, _stage_seconds(procs[0].metrics())
    finally:
        for p in procs:
            p.stop()


def _announce(settings, versions: dict[str, str]) -> None:
    """Announce the published versions (role -> version) on this run's models.versions (each run has its own topics)."""
    from streams.kafka.announce import Announcer
    from trainers.storage.registry import ModelStore

    store, announcer = ModelStore(settings.models_dir), Announcer(settings)
    for role, version in versions.items():
        store.promote(version, role, announce=announcer, reason="bench")


def _latency(settings, pairs, rate: float) -> dict:
    from streams.kafka.admin import ensure_topics
    from streams.sdk import PreferenceProducer, TopicReader
    from tests.helpers import WorkerProcess, wait_for_scored

    ensure_topics(settings)
    worker = WorkerProcess(settings, worker_id="lat").start()
    lat: list[float] = []
    done = threading.Event()

    def read() -> None:
        with TopicReader(settings.topic("prefs.scored"), "ScoredPair", settings) as reader:
            for rec in reader.records(idle_timeout=60):
                if "sent_at_ms" not in rec["pair"]["metadata"]:
                    continue
                lat.append(time.time() - int(rec["pair"]["metadata"]["sent_at_ms"]) / 1000)
                if len(lat) == len(pairs):
                    break
        done.set()

    try:
        # Warm up: the first records wait for the consumer group to form and for the producer to
        # connect and get its idempotent producer id, which is start-up, not latency. So the same
        # producer sends the warm-up and the measured records.
        with PreferenceProducer(settings) as producer:
            # Pairs of their own: a measured pair that nearly repeated a warm-up would be dead-lettered as a near
            # duplicate, never scored.
            warm = {producer.send({"prompt": f"Warm-up {i}: say hello.", "chosen": f"Hello {i}, nice to meet you.",
                                   "rejected": "No.", "metadata": {"warmup": "1"}}) for i in range(5)}
            producer.flush()
            wait_for_scored(settings, warm, timeout=300)
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            time.sleep(2)  # the reader has its partitions before the first measured record
            t0 = time.perf_counter()
            for i, p in enumerate(pairs):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                producer.send(dict(p, metadata={"sent_at_ms": str(int(time.time() * 1000))}, pair_id=None))
                producer._producer.poll(0)
        done.wait(300)
    finally:
        worker.stop()
    if not lat:
        raise RuntimeError(f"no scored record arrived during the latency run; see {worker.log}")
    arr = np.array(lat) * 1000
    return {"rate_pairs_per_s": round(rate, 2), "records": len(lat), "p50_ms": round(float(np.percentile(arr, 50)), 1),
            "p99_ms": round(float(np.percentile(arr, 99)), 1)}


def run(n: int, latency_s: float, repeats: int, given: dict[str, Path] | None = None, scaling: bool = True) -> dict:
    """``given``: model directories by role ("current", "gold") to serve instead of the bootstrap alone."""
    from streams.embedded.process import free_port
    from streams.embedded.stack import Stack
    from streams.runtime.processors.scorer import bootstrap_model, load_announced
    from streams.settings import Settings, WorkerSettings
    from trainers.storage.registry import ModelStore

    pairs = [{k: p[k] for k in ("conversation", "chosen", "rejected")} for p in hh_pairs(n)]
    home = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    base = Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0", home=home,
                    models_dir=home / "models", shards_dir=home / "shards")
    # What the worker serves, loaded the way it loads them, on the same backends. Given directories are
    # published first: the store refuses one that is not a model directory before anything slow runs.
    store = ModelStore(base.models_dir)
    given = given or {}
    versions = {role: store.publish(d, role).version for role, d in given.items()}
    models = [load_announced(store.version_record(v, role, "promote", "bench")) for role, v in versions.items()]
    if "current" not in versions:
        models.insert(0, bootstrap_model(WorkerSettings().bootstrap_max_length))

    # As the worker does after start-up (streams.runtime.worker): what is loaded now is never rescanned by the
    # collector, so the anchor does not pay for this process's larger heap on every collection.
    gc.collect()
    gc.freeze()

    def bare() -> float:
        t = time.perf_counter()
        for rm in models:
            rm.score_pairs(pairs)
        return time.perf_counter() - t
    stack = Stack(base)
    stack.up()
    # This machine's speed drifts by 15% over minutes (other tenants), so the bare scorer runs before and
    # after every end-to-end run and each run is compared with the mean of its two neighbours.
    bare_s, one_s, stages = [bare()], [], {}
    try:
        for _ in range(repeats):
            secs, stages = _e2e(_settings(base, home), pairs, 1, versions)
            one_s.append(secs)
            bare_s.append(bare())
        one = float(np.median(one_s))
        two = _e2e(_settings(base, home), pairs, 2, versions)[0] if scaling else None
        rate = 0.5 * n / one
        lat = _latency(_settings(base, home), pairs[: max(20, int(rate * latency_s))], rate) if latency_s > 0 else None
    finally:
        stack.down()
    ratios = [(bare_s[i] + bare_s[i + 1]) / 2 / one_s[i] for i in range(repeats)]
    bare_mid = float(np.median(bare_s))
    return {
        "pairs": n, "models": [f"{given.get('current', 'bootstrap')} (current)"] + ([f"{given['gold']} (gold)"] if "gold" in given else []),
        "bare_scorer_pairs_per_s": round(n / bare_mid, 2), "e2e_1_worker_pairs_per_s": round(n / one, 2),
        "e2e_2_workers_pairs_per_s": round(n / two, 2) if two else None, "e2e_vs_bare": round(float(np.median(ratios)), 3),
        "e2e_vs_bare_each_run": [round(r, 3) for r in ratios], "bare_scorer_seconds_each": [round(b, 2) for b in bare_s],
        "e2e_1_worker_seconds_each": [round(x, 2) for x in one_s],
        "scaling_2_vs_1": round(one / two, 3) if two else None, "latency_at_half_max_rate": lat,
        # Seconds the last one-worker run spent per stage (its wall time is the last of e2e_1_worker_seconds_each).
        "one_worker_stage_seconds": stages, "bare_scorer_seconds": round(bare_mid, 2),
        "targets": {"e2e_vs_bare": ">= 0.9", "p99_ms": "< 500"},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=1000, help="HH-RLHF pairs per run (1,000: two runs agreed within 0.3%%)")
    ap.add_argument("--latency-seconds", type=float, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="one-worker runs, each between two bare-scorer runs")
    ap.add_argument("--gold", type=Path, metavar="DIR",
                    help="a reward model directory to serve as the gold model (its ONNX files are used as the worker "
                         "would); the result goes to pipeline-gold.json")
    ap.add_argument("--current", type=Path, metavar="DIR",
                    help="a reward model directory to serve instead of the bootstrap (python -m bench.random_model makes "
                         "a larger one); the result goes to pipeline-current.json")
    args = ap.parse_args(argv)
    given = {opt: d for opt, d in (("current", args.current), ("gold", args.gold)) if d is not None}
    try:
        # With a given model the 2-worker and latency runs are skipped: they are the plain run's questions.
        result = run(args.pairs, 0 if given else args.latency_seconds, args.repeats, given, scaling=not given)
    except RegistryError as exc:  # a given directory is not a model directory
        ap.error(str(exc))
    command = f"python -m bench.pipeline --pairs {args.pairs} --repeats {args.repeats}" + "".join(
        f" --{opt} {d}" for opt, d in given.items())
    write_result("-".join(["pipeline", *given]), result, command)
    return result


if __name__ == "__main__":
    print(main())
