"""The fault suite: hostile input, killed workers, a killed review app and a restarted Redis, at once.

- Good pairs interleaved with a generated corpus of hostile records (tests/hostile_corpus.py),
  published by kcat (half) and by the SDK / a raw confluent-kafka producer (the rest): every good
  pair is scored exactly once (by identity), every hostile record is dead-lettered with its reason,
  scored (a legal pair with a hostile prompt) or deduplicated, and no worker exits on its own.
- Three workers in one group; one is killed with SIGKILL (and restarted with the same worker id)
  while simulated annotators answer review tasks through a `prefstream review` subprocess, which is
  itself killed and restarted: nothing lost or duplicated in prefs.scored, the Avro shards and
  prefs.verified.
- Redis killed and restarted mid-review, once keeping its append-only file and once empty: every
  review task still ends with one VerifiedPair.
- Attacks: code pairs whose chosen response leaves before its tests run (``sys.exit(0)``,
  ``os._exit(0)``, a printed "pass"), signed so their tests are honoured: none reaches a shard as
  verified_by_tool (``send_exit_cheats`` / ``poisoned_code_rows``).
- Poisoning: every attack on the training data at once beside honest traffic, on one worker (with its
  shard writer) and one review app (with its aggregator): a spoofed vouch, forged and altered expert
  Annotations, replayed, foreign-signed and cross-role announcements, a curated row of an aborted
  transaction and the exit-code cheats. Each is refused for its reason, no shard row has a label or
  split an attack chose, and the worker serves what it served before (``run_poisoning``).

"Once" is by identity (streams/kafka/reader.py): the embedded broker shows records of aborted
transactions to read_committed readers, so a batch redone after a kill is read twice; such copies
are counted (``extra copies``) but are not duplicates.

The default run has small variants; the long ones are marked ``slow`` and run by `make chaos`
(tests/chaos.py), which prints the table and writes it to bench/results/chaos.{json,md}.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.embedded.process import free_port
from streams.kafka import topics
from streams.review.simulate import truth_key
from tests.helpers import (
    ROOT,
    FakeMessage,
    WorkerProcess,
    fake_pipeline,
    needs_bwrap,
    review_task,
    settings_env,
    wait_for_scored,
)
from tests.hostile_corpus import Hostile, corpus, good_pairs

RESULTS_ENV = "PREFSTREAM_CHAOS_RESULTS"  # a directory: where each run writes chaos-<name>.json (tests/chaos.py)
ANNOTATORS = {"alice": "alice-token-0001", "bob": "bob-token-000022", "carol": "carol-token-0003",
              "dave": "dave-token-000044", "frank": "frank-token-00066", "gina": "gina-token-000077"}
EXPERT = ("erin", "expert-token-0005")
TOKENS = ",".join(f"{n}:{t}" for n, t in {**ANNOTATORS, EXPERT[0]: EXPERT[1]}.items())


# ---------------------------------------------------------------------------------------------- corpus, no broker
def test_every_hostile_record_meets_its_expected_fate_in_the_pipeline():
    """The corpus itself, through the real per-record logic with fakes: the expected reasons hold."""
    from schemas.pairs import validate_pair
    from schemas.wire import ValueCodec

    good = good_pairs(40, "unit")
    hostile = corpus(230, good, seed=3, five_mb=1)
    codec = ValueCodec()
    msgs = []
    for i, p in enumerate(good):  # the originals first, as the integration run sends them
        v, h = codec.encode("PreferencePair", validate_pair(p), "prefs.raw")
        msgs.append(FakeMessage(v, key=p["pair_id"].encode(), headers=h, offset=i))
    for i, h in enumerate(hostile):
        msgs.append(FakeMessage(h.value, key=h.key, headers=list(h.headers) or None, offset=1000 + i))
    out = fake_pipeline().process(msgs)
    schemas = {"prefs.scored": "ScoredPair", "prefs.review": "ReviewTask", "prefs.curated": "CuratedPair",
               "prefs.dlq": "DeadLetter"}
    by_topic: dict[str, list[dict]] = defaultdict(list)
    for topic, _key, value, headers in out:
        by_topic[topic].append(codec.decode(schemas[topic], value, headers, topic))
    dead = {d["source_offset"]: d for d in by_topic["prefs.dlq"]}
    scored = Counter(s["pair"]["pair_id"] for s in by_topic["prefs.scored"])
    chosen = {s["pair"]["pair_id"]: s["pair"]["chosen"] for s in by_topic["prefs.scored"]}
    wrong = []
    for i, h in enumerate(hostile):
        d = dead.get(1000 + i)
        if h.expect in ("dlq", "conflict"):
            if d is None or d["reason"] not in h.reasons:
                wrong.append((h.cls, d and (d["reason"], d["detail"][:200]), sorted(h.reasons)))
        elif d is not None:
            wrong.append((h.cls, (d["reason"], d["detail"][:200]), h.expect))
        elif scored[h.pair_id] != 1:
            wrong.append((h.cls, f"{h.pair_id} scored {scored[h.pair_id]} times", h.expect))
    assert not wrong, f"{len(wrong)} hostile records did not meet their fate, e.g. {wrong[:8]}"
    assert all(scored[p["pair_id"]] == 1 for p in good)
    assert all(chosen[p["pair_id"]] == p["chosen"] for p in good), "a duplicate id replaced a good pair's text"
    assert all(d["detail"] and d["processor"] for d in by_topic["prefs.dlq"])


# ---------------------------------------------------------------------------------------------- processes
class ReviewProcess:
    """`prefstream review` in a subprocess on a fixed port (a restart comes back at the same URL)."""

    def __init__(self, settings, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A short lease: a task leased when the app was killed returns to the others within seconds.
        self.env = settings_env(settings) | {"PREFSTREAM_REVIEW_TOKENS": TOKENS, "PREFSTREAM_REVIEW_EXPERTS": EXPERT[0],
                                             "PREFSTREAM_REVIEW_RATE_PER_S": "1000", "PREFSTREAM_REVIEW_LEASE_S": "5"}
        self.log = log_dir / "review.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait: float = 120) -> ReviewProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "review", "--port", str(self.port)],
                                     env=self.env, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + wait
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1)
                return self
            except OSError:
                assert self.proc.poll() is None, f"review app exited {self.proc.returncode}:\n{self.tail()}"
                assert time.monotonic() < deadline, f"review app not up after {wait} s:\n{self.tail()}"
                time.sleep(0.3)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else None


class Annotators:
    """Simulated annotators (streams.review.simulate, what `prefstream annotate --simulate` runs) in a loop:
    when the app goes away their threads stop; the loop signs them in again until told to stop."""

    def __init__(self, url: str, truths: dict[frozenset[str], str], accuracy: float = 0.9) -> None:
        self.url, self.truths, self.accuracy = url, truths, accuracy
        self.stop = threading.Event()
        self.answered = self.rounds = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, name="annotators", daemon=True)

    def start(self) -> Annotators:
        self.thread.start()
        return self

    def _loop(self) -> None:
        from streams.review.simulate import simulate

        while not self.stop.is_set():
            try:
                st = simulate(self.url, list(ANNOTATORS.values()), self.accuracy, self.truths, idle_s=2.0,
                              seed=self.rounds, expert_tokens=[EXPERT[1]], stop=self.stop)
                self.answered += st.answered
                self.errors += st.errors[:5]
                worked = st.answered
            except Exception as exc:  # noqa: BLE001 - the app being away is what this tests
                self.errors.append(repr(exc)[:300])
                worked = 0
            self.rounds += 1
            if not worked:
                time.sleep(0.3)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def routed_task(t: tuple) -> bool:
    """A Follower row of prefs.review (task_id, pair_id, expert, reason) for a pair the worker routed to
    review: not an expert task, a re-annotation or an audit (those end in no VerifiedPair of their own)."""
    return not t[2] and t[3] != "reannotation" and not (t[3] or "").startswith("audit:")


class Follower:
    """Follows one topic from the beginning (no group), keeping what ``keep`` makes of each record."""

    def __init__(self, settings, name: str, schema: str, keep=lambda rec: rec) -> None:
        from streams.kafka.reader import TopicReader

        self.reader = TopicReader(settings.topic(name), schema, settings)
        self.keep, self.records = keep, []

    def poll(self, idle: float = 0.5, cap: float = 20.0) -> list:
        started = time.monotonic()
        for rec in self.reader.decoded(idle_timeout=idle):
            self.records.append(self.keep(rec.value))
            if time.monotonic() - started > cap:
                break
        return self.records

    @property
    def undecodable(self) -> int:
        return self.reader.undecodable

    def close(self) -> None:
        self.reader.close()


def kcat_tool(tmp: Path) -> dict | None:
    """Debian's kcat with the librdkafka confluent-kafka ships (see tests/test_produce_consume.py), or None."""
    path = shutil.which("kcat")
    if path is None:
        return None
    import confluent_kafka

    libs = sorted((Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs").glob("librdkafka*.so*"))
    env = dict(os.environ)
    if libs:
        libdir = tmp / "rdkafka"
        libdir.mkdir(exist_ok=True)
        if not (libdir / "librdkafka.so.1").exists():
            (libdir / "librdkafka.so.1").symlink_to(libs[0])
        env["LD_LIBRARY_PATH"] = str(libdir)
    return {"bin": path, "env": env}


def kcat_send(kcat: dict, settings, values: list[bytes], tmp: Path, headers: tuple = ()) -> None:
    """One message per file (kcat -P FILE...), so values may hold newlines and any bytes."""
    from streams.kafka.topics import MAX_MESSAGE_BYTES

    if not values:
        return
    d = tmp / f"kcat-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    files = []
    for i, v in enumerate(values):
        f = d / f"{i:06d}.msg"
        f.write_bytes(v)
        files.append(str(f))
    cmd = [kcat["bin"], "-P", "-b", settings.bootstrap, "-t", settings.topic(topics.RAW),
           "-X", f"message.max.bytes={MAX_MESSAGE_BYTES}"]
    for k, v in headers:
        cmd += ["-H", f"{k}={v.decode()}"]
    for start in range(0, len(files), 200):
        out = subprocess.run(cmd + files[start:start + 200], env=kcat["env"], capture_output=True, timeout=120)
        assert out.returncode == 0 and b"ERROR" not in out.stderr, out.stderr.decode(errors="replace")[-2000:]
    shutil.rmtree(d, ignore_errors=True)


def start_all(workers: list[WorkerProcess]) -> None:
    with ThreadPoolExecutor(len(workers)) as ex:
        list(ex.map(lambda w: w.start(wait_ready=300), workers))


def chunks(items: list, k: int) -> list[list]:
    return [items[j * len(items) // k:(j + 1) * len(items) // k] for j in range(k)]


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Config:
    name: str
    good: int
    hostile: int
    workers: int = 3
    worker_kills: int = 1
    review_kills: int = 1
    five_mb: int | None = None
    timeout: float = 300.0


SMALL = Config("small", good=100, hostile=100, worker_kills=1, review_kills=1, five_mb=2, timeout=300)
LONG = Config("long", good=1000, hostile=1000, worker_kills=3, review_kills=2, five_mb=10, timeout=1200)


def _slim_dead(rec: dict) -> dict:
    """A DeadLetter without its original bytes (5 MB ones add up); the pair id when the original is a pair."""
    pid = None
    if rec["original_value"] is not None and not rec["original_truncated"]:
        try:
            from schemas.wire import ValueCodec

            pid = ValueCodec().decode("PreferencePair", rec["original_value"],
                                      list(rec["original_headers"].items()))["pair_id"]
        except Exception:  # noqa: BLE001 - a hostile original is expected not to decode
            pid = None
    return {"sha": rec["original_sha256"], "reason": rec["reason"], "processor": rec["processor"],
            "detail": rec["detail"][:300], "id": (rec["source_topic"], rec["source_partition"], rec["source_offset"]),
            "pair_id": pid}


def run_faults(settings, tmp: Path, cfg: Config) -> dict:
    """Run one fault scenario and return its measurements (asserted by the caller after they are saved)."""
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config
    from streams.kafka.reader import curated_identity, identity
    from streams.sdk import PreferenceProducer
    from trainers.storage.shards import iter_records, leftovers

    t0 = time.monotonic()
    rng = random.Random(f"faults-{cfg.name}")
    tag = f"f{uuid.uuid4().hex[:6]}"
    kcat = kcat_tool(tmp)
    notes = [] if kcat else ["kcat is not installed: the kcat half was sent by the raw producer instead "
                             "(apt-get install kcat; .ci/run installs it)"]
    good = good_pairs(cfg.good, tag, seed=1)
    sdk_good, kcat_good = (good[0::2], good[1::2]) if kcat else (good, [])
    hostile = corpus(cfg.hostile, sdk_good, seed=2, five_mb=cfg.five_mb)
    dups = [h for h in hostile if h.expect in ("dedup", "conflict")]  # sent after their originals
    rest = [h for h in hostile if h.expect not in ("dedup", "conflict")]
    via_kcat = {id(h) for n, h in enumerate(rest)  # kcat -H takes text: binary header values go by the raw producer
                if kcat and h.kcat and n % 2 == 0 and all(v.isascii() and b"\0" not in v for _, v in h.headers)}
    channel = {id(h): ("kcat" if id(h) in via_kcat else "raw") for h in hostile}
    truths = {truth_key(p["chosen"], p["rejected"]): p["chosen"] for p in good}

    n_chunks = cfg.worker_kills + 1
    sdk_parts, kgood_parts = chunks(sdk_good, n_chunks), chunks(kcat_good, n_chunks)
    raw_parts = chunks([h for h in rest if id(h) not in via_kcat], n_chunks)
    khost_parts = chunks([h for h in rest if id(h) in via_kcat], n_chunks)

    env = {"PREFSTREAM_WORKER_THREADS": "1"}
    workers = [WorkerProcess(settings, worker_id=f"{tag}-w{i}", extra_env=env) for i in range(cfg.workers)]
    victim = workers[0]
    review = ReviewProcess(settings, tmp)
    sdk, raw = PreferenceProducer(settings), Producer(producer_config(settings))
    raw_topic = settings.topic(topics.RAW)
    unplanned: list[str] = []
    planned_kills = 0
    review_kill_log: list[dict] = []

    def check_alive(skip=None) -> None:
        for w in workers:
            if w is not skip and w.proc is not None and w.proc.poll() is not None:
                unplanned.append(f"{w.worker_id} exited {w.proc.returncode}: {w.log.read_text(errors='replace')[-1500:]}")
                w.start(wait_ready=300)  # keep the run going; the exit is reported

    def publish(j: int) -> None:
        good_j, bad_j = sdk_parts[j], raw_parts[j]
        for n in range(max(len(good_j), len(bad_j))):  # good and hostile interleaved
            if n < len(good_j):
                sdk.send(good_j[n])
            if n < len(bad_j):
                raw.produce(raw_topic, value=bad_j[n].value, key=bad_j[n].key, headers=list(bad_j[n].headers) or None)
                raw.poll(0)
        sdk.flush(120)
        assert raw.flush(120) == 0
        if kcat:
            plain = [h for h in khost_parts[j] if not h.headers]
            mixed: list[bytes] = []
            for n in range(max(len(kgood_parts[j]), len(plain))):  # interleaved in one kcat run
                if n < len(kgood_parts[j]):
                    mixed.append(json.dumps(kgood_parts[j][n]).encode())
                if n < len(plain):
                    mixed.append(plain[n].value)
            kcat_send(kcat, settings, mixed, tmp)
            by_header: dict[tuple, list[bytes]] = defaultdict(list)
            for h in khost_parts[j]:
                if h.headers:
                    by_header[h.headers].append(h.value)
            for headers, values in by_header.items():
                kcat_send(kcat, settings, values, tmp, headers)

    followers = {
        "scored": Follower(settings, topics.SCORED, "ScoredPair",
                           lambda r: (identity("ScoredPair", r), r["pair"]["chosen"], r["route"])),
        "dlq": Follower(settings, topics.DLQ, "DeadLetter", _slim_dead),
        "review": Follower(settings, topics.REVIEW, "ReviewTask",
                           lambda r: (r["task_id"], r["pair"]["pair_id"], bool(r.get("expert")), r.get("reason"))),
        "verified": Follower(settings, topics.VERIFIED, "VerifiedPair",
                             lambda r: (r["pair"]["pair_id"], r["label"], r["decided_by"], tuple(sorted(r["annotators"])))),
        "curated": Follower(settings, topics.CURATED, "CuratedPair", lambda r: curated_identity(r)),
    }
    annotators = Annotators(review.url, truths)
    review_chaos_done = threading.Event()

    def review_chaos() -> None:
        """Kill the review app while verdicts flow (at least 15 more since the last kill, or after 90 s)."""
        verdicts = Follower(settings, topics.ANNOTATIONS, "Annotation", lambda r: r["annotation_id"])
        try:
            for _ in range(cfg.review_kills):
                base, deadline = len(set(verdicts.poll(0.1, 0.3))), time.monotonic() + 90
                while len(set(verdicts.poll(0.1, 0.3))) < base + 15 and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(rng.uniform(0.2, 1.5))
                at = len(set(verdicts.poll(0.1, 0.3)))
                review.kill9()
                time.sleep(rng.uniform(0.5, 2.0))
                review.start()
                review_kill_log.append({"verdicts_before": at, "t": round(time.monotonic() - t0, 1)})
        finally:
            verdicts.close()
            review_chaos_done.set()

    timings: dict[str, float] = {}
    try:
        start_all(workers)
        review.start()
        annotators.start()
        threading.Thread(target=review_chaos, name="review-chaos", daemon=True).start()
        timings["started"] = time.monotonic() - t0
        publish(0)
        for j in range(1, n_chunks):
            time.sleep(rng.uniform(2, 5))
            check_alive()
            victim.kill9()
            planned_kills += 1
            publish(j)  # while the victim is dead: its partitions move to the others
            victim.start(wait_ready=300)
        # Duplicate ids last: after their originals (same key, so the same partition, later offsets).
        for h in dups:
            raw.produce(raw_topic, value=h.value, key=h.key, headers=list(h.headers) or None)
        assert raw.flush(120) == 0
        timings["published"] = time.monotonic() - t0

        must_score = {p["pair_id"] for p in good} | {h.pair_id for h in hostile if h.expect == "scored"}
        must_dead = {h.sha256 for h in hostile if h.expect in ("dlq", "conflict") and h.value is not None}
        n_tombstones = sum(1 for h in hostile if h.expect == "dlq" and h.value is None)
        deadline = time.monotonic() + cfg.timeout
        while time.monotonic() < deadline:
            check_alive()
            scored_ids = {i[0][0] for i in followers["scored"].poll()}
            dead = followers["dlq"].poll()
            dead_shas = {d["sha"] for d in dead}
            tombs = len({d["id"] for d in dead if d["sha"] is None})
            if must_score <= scored_ids and must_dead <= dead_shas and tombs >= n_tombstones:
                break
            time.sleep(1)
        timings["scored_and_dead_lettered"] = time.monotonic() - t0

        # Review: every routed task (not an expert or re-annotation task) ends with one VerifiedPair.
        while time.monotonic() < deadline:
            check_alive()
            tasks = {t[1] for t in followers["review"].poll() if routed_task(t)}
            verified = {v[0] for v in followers["verified"].poll()}
            if review_chaos_done.is_set() and tasks <= verified:
                break
            time.sleep(1)
        timings["reviewed"] = time.monotonic() - t0

        # Shards: every curated identity (routed and gold) in the committed shard records, once.
        def shard_rows() -> tuple[Counter, int]:
            rows: Counter = Counter()
            for _, rec in iter_records(Path(settings.shards_dir)):  # the committed records, as a retrain reads them
                rows[(rec["pair"]["pair_id"], "gold" if rec["split"] == "gold" else "routed")] += 1
            return rows, len(leftovers(Path(settings.shards_dir)))

        expect_shards = set(followers["curated"].poll())
        shard_deadline = min(deadline, time.monotonic() + 120)
        while True:
            rows, incomplete = shard_rows()
            expect_shards = set(followers["curated"].poll())
            if expect_shards <= set(rows) or time.monotonic() > shard_deadline:
                break
            time.sleep(1)
        time.sleep(2)  # a late second copy, if one were written, would be flushed by now
        rows, incomplete = shard_rows()
        timings["sharded"] = time.monotonic() - t0
        check_alive()
    finally:
        annotators.close()
        review_rc = review.stop()
        worker_rcs = {w.worker_id: w.stop() for w in workers}
        # What each reader still held undecided and what it dropped as uncommitted: a record "lost" while its
        # reader holds rows says a marker never came (streams/kafka/committed.py), not that nothing was written.
        undecided = {name: {"held": f.reader.filter.held(), "dropped": f.reader.filter.dropped,
                            "unreadable": f.reader.filter.unreadable} for name, f in followers.items()}
        for f in followers.values():
            f.close()

    return analyse(cfg, tag, good, sdk_good, kcat_good, hostile, channel, followers, rows, incomplete, {
        "undecided": undecided, "notes": notes, "planned_worker_kills": planned_kills, "unplanned_worker_exits": unplanned,
        "review_kills": review_kill_log, "review_starts": review.starts, "review_rc": review_rc,
        "worker_rcs": worker_rcs, "answered": annotators.answered, "annotator_rounds": annotators.rounds,
        "annotator_errors": annotators.errors[:10], "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "kcat": bool(kcat), "review_log_tracebacks": review.tail(200_000).count("Traceback"),
        "worker_log_tracebacks": {w.worker_id: w.log.read_text(errors="replace").count("Traceback") for w in workers},
    })


def analyse(cfg, tag, good, sdk_good, kcat_good, hostile, channel, followers, rows, incomplete, extra) -> dict:
    scored = followers["scored"].records
    ids_by_pair: dict[str, set] = defaultdict(set)
    copies = Counter()
    chosen: dict[str, set] = defaultdict(set)
    for ident, text, _route in scored:
        ids_by_pair[ident[0]].add(ident)
        copies[ident] += 1
        chosen[ident[0]].add(text)
    dead = followers["dlq"].records
    dead_by_sha: dict[str | None, set] = defaultdict(set)
    reasons_by_sha: dict[str | None, set] = defaultdict(set)
    dead_copies = Counter(d["id"] for d in dead)
    dead_pair_ids = Counter()
    hostile_shas = {h.sha256 for h in hostile}
    for d in dead:
        dead_by_sha[d["sha"]].add(d["id"])
        reasons_by_sha[d["sha"]].add(d["reason"])
        if d["pair_id"] and d["sha"] not in hostile_shas:
            dead_pair_ids[d["pair_id"]] += 1
    table = []

    def row(name, sent, dlq=0, scored_n=0, dedup=0, lost=0, dup=0, wrong=0, extra_copies=0, examples=()):
        table.append({"class": name, "sent": sent, "dead_lettered": dlq, "scored": scored_n, "deduplicated": dedup,
                      "lost": lost, "duplicated": dup, "wrong_reason": wrong, "extra_copies": extra_copies,
                      "examples": list(examples)[:3]})

    for name, pairs in (("good pair (SDK)", sdk_good), ("good pair (kcat, JSON)", kcat_good)):
        if not pairs:
            continue
        ids = [p["pair_id"] for p in pairs]
        ok = [i for i in ids if len(ids_by_pair[i]) >= 1]
        dup = [i for i in ids if len(ids_by_pair[i]) > 1]
        lost = [i for i in ids if not ids_by_pair[i]]
        row(name, len(ids), dlq=sum(1 for i in ids if dead_pair_ids[i]), scored_n=len(ok), lost=len(lost), dup=len(dup),
            extra_copies=sum(copies[x] - 1 for i in ids for x in ids_by_pair[i]), examples=lost[:3] + dup[:3])
    text_of = {p["pair_id"]: p["chosen"] for p in good}
    by_class: dict[str, list[Hostile]] = defaultdict(list)
    for h in hostile:
        by_class[h.cls].append(h)
    n_tombs_dead = len(dead_by_sha.get(None, set()))
    for cls, hs in sorted(by_class.items()):
        dlq = wrong = lost = dup = sc = dd = extra_c = 0
        examples = []
        for h in hs:
            if h.expect == "conflict" and chosen[h.pair_id] - {text_of[h.pair_id]}:
                wrong += 1
                examples.append(f"{h.pair_id} scored with the conflicting copy's text")
            if h.expect in ("dlq", "conflict"):
                if h.value is None:  # tombstones have no hash: counted together
                    got = 1 if n_tombs_dead > 0 else 0
                    n_tombs_dead -= got
                    dlq += got
                    lost += 1 - got
                    continue
                ids = dead_by_sha.get(h.sha256, set())
                if ids:
                    dlq += 1
                    if not reasons_by_sha[h.sha256] <= h.reasons:
                        wrong += 1
                        examples.append(f"{sorted(reasons_by_sha[h.sha256])} not in {sorted(h.reasons)}")
                    dup += len(ids) > 1
                    extra_c += sum(dead_copies[i] - 1 for i in ids)
                else:
                    lost += 1
                    examples.append(f"never dead-lettered: {h.value[:80]!r}")
            elif h.expect == "scored":
                n = len(ids_by_pair[h.pair_id])
                sc += n >= 1
                lost += n == 0
                dup += n > 1
                if h.sha256 in dead_by_sha:
                    wrong += 1
                    examples.append(f"{h.pair_id} dead-lettered: {sorted(reasons_by_sha[h.sha256])}")
            else:  # dedup: the good pair is scored once, with its own text; the copy is not dead-lettered
                n = len(ids_by_pair[h.pair_id])
                dd += n == 1 and chosen[h.pair_id] == {text_of[h.pair_id]}
                dup += n > 1
                lost += n == 0
                if chosen[h.pair_id] - {text_of[h.pair_id]}:
                    wrong += 1
                    examples.append(f"{h.pair_id} scored with the copy's text")
                if h.sha256 in dead_by_sha:
                    wrong += 1
                    examples.append(f"duplicate {h.pair_id} dead-lettered: {sorted(reasons_by_sha[h.sha256])}")
        kc = sum(channel[id(h)] == "kcat" for h in hs)
        row(f"{cls}" + (f" ({kc} via kcat)" if kc else ""), len(hs), dlq, sc, dd, lost, dup, wrong, extra_c, examples)

    expected_ids = {p["pair_id"] for p in good} | {h.pair_id for h in hostile if h.expect == "scored"}
    unexpected_scored = sorted(set(ids_by_pair) - expected_ids)
    known_shas = hostile_shas | {None}
    unexplained_dead = [d for d in dead if d["sha"] not in known_shas]

    tasks = {t[1] for t in followers["review"].records if routed_task(t)}
    verified = followers["verified"].records
    v_labels: dict[str, set] = defaultdict(set)
    for pid, label, _by, _ann in verified:
        v_labels[pid].add(label)
    expect_shards = set(followers["curated"].records)
    review_summary = {
        "tasks": len(tasks), "verified": len(set(v_labels) & tasks), "lost": sorted(tasks - set(v_labels))[:20],
        "n_lost": len(tasks - set(v_labels)), "unexpected": sorted(set(v_labels) - tasks)[:20],
        "conflicting_labels": sorted(p for p, ls in v_labels.items() if len(ls) > 1)[:20],
        "extra_copies": len(verified) - len(v_labels),
        "by": dict(Counter(v[2] for v in {v[0]: v for v in verified}.values())),
    }
    shard_summary = {
        "expected": len(expect_shards), "rows": sum(rows.values()), "lost": len(expect_shards - set(rows)),
        "duplicated_rows": sum(n - 1 for n in rows.values() if n > 1), "unexpected": len(set(rows) - expect_shards),
        "incomplete_files": incomplete, "gold": sum(1 for k in rows if k[1] == "gold"),
        "examples_lost": [list(k) for k in sorted(expect_shards - set(rows))[:5]],
        "examples_dup": [list(k) for k, n in rows.items() if n > 1][:5],
    }
    routes = Counter(r for (_i, _t, r) in {x[0]: x for x in scored}.values())
    return {"name": cfg.name, "tag": tag, "config": cfg.__dict__, "table": table,
            "scored": {"identities": len({x[0] for x in scored}), "records_read": len(scored),
                       "unexpected": unexpected_scored[:20], "n_unexpected": len(unexpected_scored),
                       "routes": dict(routes), "undecodable": followers["scored"].undecodable},
            "dlq": {"records_read": len(dead), "distinct": len({d["id"] for d in dead}),
                    "unexplained": unexplained_dead[:5], "n_unexplained": len(unexplained_dead)},
            "review": review_summary, "shards": shard_summary, **extra}


def save(result: dict, tmp: Path) -> Path:
    from tests.chaos import render

    out_dir = Path(os.environ.get(RESULTS_ENV) or tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"chaos-{result['name']}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print("\n" + render([result]))
    return path


def check(result: dict) -> None:
    from tests.chaos import render

    table = render([result])
    problems = []
    for r in result["table"]:
        if r["lost"] or r["duplicated"] or r["wrong_reason"]:
            problems.append(f"{r['class']}: lost {r['lost']}, duplicated {r['duplicated']}, wrong {r['wrong_reason']} "
                            f"{r['examples']}")
    if result["scored"]["n_unexpected"]:
        problems.append(f"unexpected scored pair ids: {result['scored']['unexpected']}")
    if result["dlq"]["n_unexplained"]:
        problems.append(f"dead letters that are not of a hostile record (a good pair?): {result['dlq']['unexplained']}")
    rv, sh = result["review"], result["shards"]
    if rv["n_lost"] or rv["unexpected"] or rv["conflicting_labels"]:
        problems.append(f"review: lost {rv['lost']}, unexpected {rv['unexpected']}, conflicting {rv['conflicting_labels']}")
    if sh["lost"] or sh["duplicated_rows"] or sh["unexpected"]:
        problems.append(f"shards: {sh}")
    if result["unplanned_worker_exits"]:
        problems.append(f"workers exited on their own: {result['unplanned_worker_exits']}")
    assert not problems, "\n".join(problems) + f"\nreaders (held undecided, dropped): {result.get('undecided')}\n\n" + table


@pytest.mark.integration
@pytest.mark.parametrize("cfg", [pytest.param(SMALL, id="small"), pytest.param(LONG, id="long", marks=pytest.mark.slow)])
def test_hostile_input_killed_workers_and_a_killed_review_app_lose_and_duplicate_nothing(settings, tmp_path, cfg):
    result = run_faults(settings, tmp_path, cfg)
    save(result, tmp_path)
    check(result)
    assert result["review"]["tasks"] > 0, "no pair went to review: the annotators had nothing to do"
    assert result["answered"] > 0 and len(result["review_kills"]) == cfg.review_kills


# ---------------------------------------------------------------------------------------------- Redis restarted
class PrivateRedis:
    """A Redis of this test's own (the session Redis is shared), started as `prefstream stack up` starts it."""

    def __init__(self, home: Path) -> None:
        from streams.embedded.process import ServerProcess

        self.home, self.port = home, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server = ServerProcess("redis", home, "127.0.0.1", self.port, marker="redis-server")
        self.data = home / "redis"

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        from streams.embedded import binaries

        self.data.mkdir(parents=True, exist_ok=True)
        self.server.start([str(binaries.redis_server()), "--port", str(self.port), "--bind", "127.0.0.1",
                           "--dir", str(self.data), "--appendonly", "yes", "--save", "", "--daemonize", "no",
                           "--protected-mode", "no"], ready=self._answers)

    def kill9(self) -> None:
        pid = self.server.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.server.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("n_tasks", [pytest.param(200, id="small"), pytest.param(1000, id="long", marks=pytest.mark.slow)])
def test_redis_restarted_mid_review_loses_no_task(settings, tmp_path, n_tasks):
    """Redis is killed twice while annotators work: restarted from its append-only file, then restarted
    empty (its files gone, as a Redis without persistence comes back). Every task ends verified once."""
    from confluent_kafka import Producer

    from schemas.wire import ValueCodec
    from streams.kafka.config import producer_config

    t0 = time.monotonic()
    red = PrivateRedis(tmp_path / "home")
    red.start()
    s = settings.model_copy(update={"redis_url": red.url})
    tasks = [review_task(1000 + i) for i in range(n_tasks)]
    codec, prod = ValueCodec(), Producer(producer_config(s))
    for t in tasks:
        v, h = codec.encode("ReviewTask", t, s.topic(topics.REVIEW))
        prod.produce(s.topic(topics.REVIEW), key=t["task_id"].encode(), value=v, headers=h)
    assert prod.flush(10) == 0
    review = ReviewProcess(s, tmp_path)
    annotators = Annotators(review.url, {truth_key(t["pair"]["chosen"], t["pair"]["rejected"]): t["pair"]["chosen"]
                                         for t in tasks})
    verified = Follower(s, topics.VERIFIED, "VerifiedPair", lambda r: (r["pair"]["pair_id"], r["label"]))
    verdicts = Follower(s, topics.ANNOTATIONS, "Annotation", lambda r: r["annotation_id"])
    verdicts.poll(0.1, 0.3)  # assigned before the first verdict
    restarts = []
    want = {t["task_id"] for t in tasks}
    try:
        review.start()
        annotators.start()
        for wipe, share in ((False, 1 / 4), (True, 1 / 2)):  # of the verdicts, read back with some lag
            deadline = time.monotonic() + 120
            while len(set(verdicts.poll(0.1, 0.3))) < share * 3 * n_tasks and time.monotonic() < deadline:
                time.sleep(0.05)
            at = len(set(verdicts.records))
            red.kill9()
            if wipe:
                shutil.rmtree(red.data)
            time.sleep(0.5)
            red.start()
            restarts.append({"wiped": wipe, "verdicts_before": at, "t": round(time.monotonic() - t0, 1)})
        deadline, last, seen = time.monotonic() + 180, time.monotonic(), (0, 0)
        while time.monotonic() < deadline and time.monotonic() - last < 20:  # give up after 20 s without progress
            got = {v[0] for v in verified.poll()}
            if want <= got:
                break
            now = (len(verified.records), len(verdicts.poll(0.1, 0.3)))
            if now != seen:
                last, seen = time.monotonic(), now
            time.sleep(1)
    finally:
        annotators.close()
        review.stop()
        verified.close()
        verdicts.close()
        red.stop()
    labels: dict[str, set] = defaultdict(set)
    for pid, label in verified.records:
        labels[pid].add(label)
    lost = sorted(want - set(labels))
    verdicts_per_task = Counter(a.rsplit(":", 1)[0] for a in set(verdicts.records))
    result = {"name": f"redis-{n_tasks}", "tasks": n_tasks, "verified": len(want & set(labels)), "lost": lost,
              "unexpected": sorted(set(labels) - want), "conflicting": sorted(p for p, ls in labels.items() if len(ls) > 1),
              "extra_copies": len(verified.records) - len(labels), "restarts": restarts, "answered": annotators.answered,
              "annotation_records": len(verdicts.records), "distinct_annotations": len(set(verdicts.records)),
              "annotation_ids_twice": sorted(a for a, n in Counter(verdicts.records).items() if n > 1)[:10],
              "tasks_over_3_verdicts": sorted(t for t, n in verdicts_per_task.items() if n > 3 and ":" not in t)[:10],
              "annotator_errors": annotators.errors[:10], "seconds": round(time.monotonic() - t0, 1),
              "review_log_tracebacks": review.tail(200_000).count("Traceback")}
    out_dir = Path(os.environ.get(RESULTS_ENV) or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"chaos-redis-{'long' if n_tasks > 200 else 'small'}.json").write_text(json.dumps(result, indent=1))
    print("\n" + json.dumps(result))
    assert not lost and not result["unexpected"] and not result["conflicting"], (
        f"{len(lost)} of {n_tasks} tasks never verified after Redis restarts {restarts}: {lost[:10]}\n"
        f"annotator errors: {annotators.errors[:5]}\nreview log:\n{review.tail(4000)}")


# ---------------------------------------------------------------------------------------------- attacks
# The code verifier attack: code pairs signed with the demo generator's key (so their metadata.tests are
# honoured and the verifier runs) whose chosen response leaves before its tests run. Trusting the exit
# status, the verifier passed them and they reached the shards as verified_by_tool with the cheat chosen.
CODE_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
WRONG_ADD = "```python\ndef add(a, b):\n    return a - b\n```"
EXIT_CHEATS = {"sys-exit": "```python\nimport sys\nsys.exit(0)\n```",
               "os-exit": "```python\nimport os\nos._exit(0)\n```",
               "fake-pass": "```python\nimport os\nprint('all tests passed', flush=True)\nos._exit(0)\n```"}


def send_exit_cheats(settings, tag: str) -> dict[str, bool]:
    """Publish the attack (one pair per cheat) and an honest control pair through the SDK with the generator's
    key; returns {pair_id: whether it may reach the shards as verified_by_tool} (only the control may)."""
    from streams.keys import GENERATOR_SOURCE, generator_signer
    from streams.sdk import PreferenceProducer

    pairs = {f"{tag}-cheat-{name}": code for name, code in EXIT_CHEATS.items()}
    control = f"{tag}-honest"
    with PreferenceProducer(settings, key=generator_signer(settings)) as producer:
        for pid, chosen in {**pairs, control: "```python\ndef add(a, b):\n    return a + b\n```"}.items():
            producer.send({"pair_id": pid, "prompt": "Write add(a, b) returning the sum.", "chosen": chosen,
                           "rejected": WRONG_ADD, "source": GENERATOR_SOURCE, "metadata": {"tests": CODE_TESTS}})
    return {**dict.fromkeys(pairs, False), control: True}


def poisoned_code_rows(shards_dir, expect: dict[str, bool]) -> list[tuple[str, str]]:
    """Shard rows of the attack's pairs that are verified_by_tool though they must not be (0 when it failed)."""
    from trainers.storage.shards import iter_records

    return [(rec["pair"]["pair_id"], rec["pair"]["chosen"][:60]) for _, rec in iter_records(shards_dir)
            if rec["split"] == "verified_by_tool" and expect.get(rec["pair"]["pair_id"]) is False]


@pytest.mark.integration
@needs_bwrap
def test_a_code_pair_that_exits_before_its_tests_never_reaches_the_shards_as_verified(settings):
    from trainers.storage.shards import iter_records

    expect = send_exit_cheats(settings, f"x{uuid.uuid4().hex[:6]}")
    worker = WorkerProcess(settings).start()
    try:
        scored = {r["pair"]["pair_id"]: r for r in wait_for_scored(settings, set(expect))}
        routes = {pid: (r["route"], r["route_reason"]) for pid, r in scored.items()}
        control = next(pid for pid, ok in expect.items() if ok)
        # The control shows the vouch was honoured and the sandbox ran: the honest code is verified.
        assert routes[control] == ("verified_by_tool", "code verifier: chosen is correct"), routes
        assert all(routes[pid][0] != "verified_by_tool" for pid, ok in expect.items() if not ok), routes
        deadline = time.monotonic() + 60
        while not any(rec["pair"]["pair_id"] == control for _, rec in iter_records(settings.shards_dir)):
            assert time.monotonic() < deadline, "the control pair never reached a shard"
            time.sleep(1)
        assert poisoned_code_rows(settings.shards_dir, expect) == []
        text = worker.metrics()
        assert "prefstream_code_sandbox_available 1.0" in text
        modes = [line for line in text.splitlines() if line.startswith("prefstream_code_sandbox_memory_mode{")]
        assert len(modes) == 3 and sum(line.endswith(" 1.0") for line in modes) == 1, modes
    finally:
        assert worker.stop() == 0


# ---------------------------------------------------------------------------------------------- poisoning
# Every attack on the training data, mounted at once on one stack (a real worker with its shard writer, the
# review app with its feeder and aggregator) beside honest traffic: the shards must hold no row whose label
# or split an attack chose, and the forged announcements must not change what the worker serves.
@dataclass
class Poisoning:
    name: str
    honest: int  # honest pairs, half before the attacks and half after the forged announcements
    copies: int  # records per attack variant
    timeout: float = 300.0


POISON_SMALL = Poisoning("poisoning-small", honest=12, copies=1, timeout=300)
POISON_LONG = Poisoning("poisoning", honest=1000, copies=10, timeout=900)
MARS_TRUTH, CAPITAL_TRUTH, CAPITAL_WRONG = "Mars has 2 moons.", "Paris.", "Lyon."
ATTACKER_SECRET = "m" * 40  # a producer key no operator listed


def _forged_annotation(task: dict, who: str) -> dict:
    """What an attacker with write access to prefs.annotations writes: an expert verdict for the rejected side."""
    pair = task["pair"]
    return {"annotation_id": f"{task['task_id']}:{who}", "task_id": task["task_id"], "pair_id": pair["pair_id"],
            "annotator": who, "verdict": "B", "order": "chosen_first", "preferred": "rejected", "strength": "much",
            "rationale": None, "expert": True, "reannotation": False, "task_category": pair.get("task_category"),
            "created_at": int(time.time() * 1000)}


def _abort_a_curated_batch(settings, pairs: list[dict]) -> None:
    """A worker of the pipeline's group reads ``pairs`` (on prefs.raw partition 0, from the group's committed
    offset) and writes each as verified_by_tool with its label swapped; its commit fails and the transaction
    is aborted, as a worker's does. The real worker then does the batch again."""
    from schemas.wire import ValueCodec
    from streams.kafka.transactions import BatchTransactions
    from streams.settings import WorkerSettings
    from tests.helpers import aborting_producer, raw_batch

    group = f"{settings.topic_prefix}{WorkerSettings().group}"
    consumer, msgs = raw_batch(settings, pairs, group)
    codec, topic = ValueCodec(settings.schema_registry_url), settings.topic(topics.CURATED)
    outputs = []
    for p in pairs:
        row = {"pair": p | {"chosen": p["rejected"], "rejected": p["chosen"]}, "split": "verified_by_tool", "p": 0.99,
               "model_version": "bootstrap", "reason": "math verifier: rejected is correct",
               "curated_at": int(time.time() * 1000)}
        outputs.append((topic, p["pair_id"].encode(), *codec.encode("CuratedPair", row, topic)))
    marked = [settings.topic(t) for t in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ, topics.DEFERRED)]
    txn = BatchTransactions(settings, f"prefstream-{group}-aborted", make_producer=aborting_producer(1), marked=marked)
    assert not txn.commit(consumer, outputs, msgs), "the injected commit failure did not abort the batch"
    consumer.close()


def run_poisoning(settings, tmp: Path, cfg: Poisoning) -> dict:
    """Mount every attack beside honest traffic; return what each attack sent, what refused it and the
    shard rows it poisoned (asserted by the caller after they are saved)."""
    from confluent_kafka import Producer

    from schemas.pairs import pair_from_json, validate_pair
    from schemas.wire import ValueCodec
    from streams import signing
    from streams.kafka.announce import Announcer
    from streams.kafka.config import producer_config
    from streams.kafka.reader import TopicReader, curated_identity
    from streams.keys import GENERATOR_SOURCE
    from streams.review.provenance import AnnotationKeys
    from streams.runtime.curation.trust import sign_pair
    from streams.sdk import PreferenceProducer
    from tests.helpers import every_record, metric, raw_announcements, vouching_pair
    from trainers.scoring.model import RewardModel
    from trainers.storage.shards import iter_records

    t0 = time.monotonic()
    tag = f"p{uuid.uuid4().hex[:6]}"
    n = cfg.copies
    codec = ValueCodec(settings.schema_registry_url)
    timings: dict[str, float] = {}

    # Two versions of the current model, both announced by the controller's key; the worker serves v2.
    model_dir = RewardModel.default(max_length=64, seed=5).save(tmp / "candidate")
    store, announce = settings.model_store(), Announcer(settings)
    v1 = store.publish(model_dir, "current", announce=announce).version
    time.sleep(0.05)  # manifests' created_at strictly increasing: v2 is the newer
    v2 = store.publish(model_dir, "current", announce=announce).version

    # A batch of the pipeline aborted after its rows reached prefs.curated (the broker delivers them).
    aborted = [validate_pair({"pair_id": f"{tag}-aborted-{i}", "prompt": f"What is the capital of France? ({tag} {i})",
                              "chosen": CAPITAL_TRUTH, "rejected": CAPITAL_WRONG}) for i in range(n)]
    _abort_a_curated_batch(settings, aborted)

    honest = good_pairs(cfg.honest, tag, seed=4)
    truth_of = {p["pair_id"]: p["chosen"] for p in honest}  # the better response of each honest pair
    truths: dict = {truth_key(p["chosen"], p["rejected"]): p["chosen"] for p in honest}
    truths[truth_key(MARS_TRUTH, "Mars has 7 moons.")] = MARS_TRUTH
    truths[truth_key(CAPITAL_TRUTH, CAPITAL_WRONG)] = CAPITAL_TRUTH
    worker = WorkerProcess(settings, worker_id=f"{tag}-w0",
                           extra_env={"PREFSTREAM_WORKER_THREADS": "1", "PREFSTREAM_WORKER_TAU": "0.99"})
    review = ReviewProcess(settings, tmp)
    annotators = Annotators(review.url, truths, accuracy=1.0)
    followers = {
        "scored": Follower(settings, topics.SCORED, "ScoredPair",
                           lambda r: (r["pair"]["pair_id"], r["route"], r["route_reason"], r["model_version"],
                                      r["gold_model_version"], sorted(r["pair"]["metadata"] or {}))),
        "dlq": Follower(settings, topics.DLQ, "DeadLetter", _slim_dead),
        "review": Follower(settings, topics.REVIEW, "ReviewTask"),
        "verified": Follower(settings, topics.VERIFIED, "VerifiedPair", lambda r: r["pair"]["pair_id"]),
        "curated": Follower(settings, topics.CURATED, "CuratedPair", curated_identity),
    }
    raw = Producer(producer_config(settings))
    raw_topic, ann_topic = settings.topic(topics.RAW), settings.topic(topics.ANNOTATIONS)
    ver_topic = settings.topic(topics.MODEL_VERSIONS)
    sent: dict[str, list] = {}  # attack -> its pair ids, annotation hashes or announcement count
    forged: dict[str, str] = {}  # sha256 of a forged Annotation -> the dead-letter reason it must get
    targets: dict[str, str] = {}  # pair id of a task an annotation attack aimed at -> its better response

    def routed_honest_tasks() -> list[dict]:
        ids = {p["pair_id"] for p in honest}
        return [t for t in followers["review"].poll(0.2, 2) if t["pair"]["pair_id"] in ids
                and routed_task((t["task_id"], t["pair"]["pair_id"], bool(t.get("expert")), t.get("reason")))]

    def wait(what: str, done, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"{what} not seen after {timeout} s:\n{worker.log.read_text()[-3000:]}"
            assert worker.proc.poll() is None, f"the worker exited {worker.proc.returncode}"
            time.sleep(0.5)

    try:
        worker.start(wait_ready=300)
        review.start()
        timings["started"] = time.monotonic() - t0
        serving_before = worker.metrics()

        # Raw pairs: honest ones, the spoofed vouch (unsigned, and signed by a key nobody listed), the
        # exit-code cheats (signed by the generator, so their tests run; an honest control among them).
        with PreferenceProducer(settings) as sdk:
            for p in honest[: len(honest) // 2]:
                sdk.send(p)
        attacker_key = signing.hmac_key(ATTACKER_SECRET, "attacker", key_id="mallory")
        for variant in ("unsigned", "unknown_key"):
            sent[f"spoofed:{variant}"] = []
            for i in range(n):
                pid = f"{tag}-mars-{variant}-{i}"
                # Each attack pair is a pair of its own: two with one content would be one pair and a duplicate.
                value = vouching_pair(pid, GENERATOR_SOURCE, prompt=f"How many moons does Mars have? ({tag} {variant} {i})")
                headers = sign_pair(pair_from_json(value), attacker_key) if variant == "unknown_key" else None
                raw.produce(raw_topic, value=value, key=pid.encode(), headers=headers)
                sent[f"spoofed:{variant}"].append(pid)
        assert raw.flush(30) == 0
        cheats = send_exit_cheats(settings, tag)
        sent["exit_code"] = [pid for pid, ok in cheats.items() if not ok]

        # Forged expert verdicts, written straight to prefs.annotations before any annotator answers.
        wait(f"{n} review tasks of honest pairs", lambda: len(routed_honest_tasks()) >= n)
        foreign = AnnotationKeys([signing.hmac_key(ATTACKER_SECRET, "attacker")])
        sent["annotation:unsigned"], sent["annotation:unknown_key"] = [], []
        for task in routed_honest_tasks()[:n]:
            targets[task["pair"]["pair_id"]] = truth_of[task["pair"]["pair_id"]]
            for variant, who in (("unsigned", "mallory"), ("unknown_key", "mallory-signed")):
                value, headers = codec.encode("Annotation", _forged_annotation(task, who), ann_topic)
                if variant == "unknown_key":
                    headers = foreign.headers(codec, value, headers, ann_topic)
                raw.produce(ann_topic, key=task["task_id"].encode(), value=value, headers=headers)
                forged[hashlib.sha256(value).hexdigest()] = f"annotation_{variant}"
                sent[f"annotation:{variant}"].append(task["pair"]["pair_id"])
        assert raw.flush(30) == 0
        annotators.start()

        # Verdicts the app signed, captured from the topic and altered to an expert verdict for the other side.
        captured: list = []
        with TopicReader(ann_topic, "Annotation", settings) as reader:
            deadline = time.monotonic() + 120
            for msg in reader.messages(idle_timeout=120):
                ann = reader.decode(msg).value
                if ann["annotator"] in ANNOTATORS and ann["verdict"] in ("A", "B") and ann["pair_id"] in truth_of:
                    captured.append((ann, msg.headers()))
                if len(captured) == n or time.monotonic() > deadline:
                    break
        assert len(captured) == n, f"only {len(captured)} signed verdicts seen"
        sent["annotation:altered"] = []
        for ann, headers in captured:
            flip = {"A": "B", "B": "A"}[ann["verdict"]]
            altered = ann | {"expert": True, "verdict": flip,
                             "preferred": {"chosen": "rejected", "rejected": "chosen"}[ann["preferred"]]}
            value, plain = codec.encode("Annotation", altered, ann_topic)
            raw.produce(ann_topic, key=ann["task_id"].encode(), value=value,
                        headers=plain + [h for h in headers if h[0] != "prefstream-schema"])
            forged[hashlib.sha256(value).hexdigest()] = "annotation_bad_signature"
            sent["annotation:altered"].append(ann["pair_id"])
            targets[ann["pair_id"]] = truth_of[ann["pair_id"]]
        assert raw.flush(30) == 0

        # Announcements: v1's own signed announcement re-published (a downgrade), the same record
        # claiming the gold role, and v1 re-announced under a key the workers do not hold.
        old = next(m for m in raw_announcements(settings) if v1.encode() in m.value())
        old_record = codec.decode("ModelVersion", old.value(), old.headers(), ver_topic)
        old_signature = [h for h in old.headers() if h[0] != "prefstream-schema"]
        forger = Announcer(settings, signer=signing.ed25519_signer(signing.new_ed25519()[0], "attacker"))
        for _ in range(n):
            raw.produce(ver_topic, key=b"current", value=old.value(), headers=old.headers())
            value, plain = codec.encode("ModelVersion", old_record | {"role": "gold",
                                                                      "announced_at": int(time.time() * 1000)}, ver_topic)
            raw.produce(ver_topic, key=b"gold", value=value, headers=plain + old_signature)
            assert raw.flush(30) == 0
            forger(store.version_record(v1, "current", "promote", "attack"))

        def refused(role: str, reason: str) -> float:
            return metric(worker.metrics(), "prefstream_model_announcements_refused_total", role=role, reason=reason)

        wait("the forged announcements refused", lambda: refused("current", "stale") >= n
             and refused("gold", "bad_signature") >= n and refused("current", "unknown_key") >= n, timeout=60)
        timings["attacked"] = time.monotonic() - t0

        # Honest traffic after the announcements: scored by v2 alone (no gold model) if nothing was swapped.
        late = honest[len(honest) // 2:]
        with PreferenceProducer(settings) as sdk:
            for p in late:
                sdk.send(p)

        must_score = ({p["pair_id"] for p in honest} | {p["pair_id"] for p in aborted} | set(cheats)
                      | set(sent["spoofed:unsigned"]) | set(sent["spoofed:unknown_key"]))
        deadline = time.monotonic() + cfg.timeout
        while time.monotonic() < deadline:
            scored_ids = {s[0] for s in followers["scored"].poll()}
            dead = {d["sha"] for d in followers["dlq"].poll()}
            if must_score <= scored_ids and set(forged) <= dead:
                break
            assert worker.proc.poll() is None, f"the worker exited {worker.proc.returncode}"
            time.sleep(1)
        timings["scored"] = time.monotonic() - t0
        while time.monotonic() < deadline:  # every routed task ends with a VerifiedPair
            tasks = {t["pair"]["pair_id"] for t in followers["review"].poll()
                     if routed_task((t["task_id"], t["pair"]["pair_id"], bool(t.get("expert")), t.get("reason")))}
            if tasks <= set(followers["verified"].poll()):
                break
            time.sleep(1)
        timings["reviewed"] = time.monotonic() - t0
        shard_deadline = min(deadline, time.monotonic() + 120)
        while True:  # every committed curated identity in the shards
            have = {(rec["pair"]["pair_id"], "gold" if rec["split"] == "gold" else "routed")
                    for _, rec in iter_records(Path(settings.shards_dir))}
            if set(followers["curated"].poll()) <= have or time.monotonic() > shard_deadline:
                break
            time.sleep(1)
        time.sleep(2)  # an aborted row, were it let through, would be flushed by now
        timings["sharded"] = time.monotonic() - t0
        worker_metrics, review_metrics = worker.metrics(), urllib.request.urlopen(review.url + "/metrics",
                                                                                   timeout=5).read().decode()
    finally:
        annotators.close()
        review_rc = review.stop()
        worker_rc = worker.stop()
        for f in followers.values():
            f.close()

    rows = [rec for _, rec in iter_records(Path(settings.shards_dir))]
    scored = {}
    for pid, route, reason, version, gold_version, meta in followers["scored"].records:
        scored.setdefault(pid, (route, reason, version, gold_version, meta))
    dead_by_sha: dict[str, set] = defaultdict(set)
    for d in followers["dlq"].records:
        dead_by_sha[d["sha"]].add(d["reason"])
    delivered_aborted = 0
    for m in every_record(settings, topics.CURATED):
        if m.value() is not None:
            rec = codec.decode("CuratedPair", m.value(), m.headers(), settings.topic(topics.CURATED))
            delivered_aborted += rec["pair"]["pair_id"] in {p["pair_id"] for p in aborted} and \
                rec["split"] == "verified_by_tool"

    def describe(r: dict) -> str:
        return f"{r['pair']['pair_id']}: {r['split']}, chosen {r['pair']['chosen'][:40]!r}, by {r['model_version']}"

    def poisoned(pids, bad) -> list[str]:
        return [describe(r) for r in rows if r["pair"]["pair_id"] in set(pids) and bad(r)]

    table: list[dict] = []
    all_poisoned: set[str] = set()  # one row may be counted against two attacks (both downgrades)

    def row(attack: str, n_sent: int, refused: int, reason: str, poison: list[str], expect_reason: bool) -> None:
        all_poisoned.update(poison)
        table.append({"attack": attack, "sent": n_sent, "refused": refused, "reason": reason,
                      "poisoned_rows": len(poison), "right_reason": expect_reason, "examples": poison[:3]})

    stripped = {v: metric(worker_metrics, "prefstream_vouches_stripped_total", reason=v)
                for v in ("unsigned", "unknown_key")}
    for variant in ("unsigned", "unknown_key"):
        pids = sent[f"spoofed:{variant}"]
        ok = [p for p in pids if p in scored and scored[p][0] != "verified_by_tool" and "answer" not in scored[p][4]]
        row(f"spoofed source ({variant.replace('_', ' ')})", len(pids), len(ok),
            f"vouch stripped: {variant} (counted {stripped[variant]:.0f}); routes "
            f"{sorted({scored[p][0] for p in pids if p in scored})}",
            poisoned(pids, lambda r: r["split"] == "verified_by_tool" or r["pair"]["chosen"] != MARS_TRUTH),
            len(ok) == len(pids) and stripped[variant] >= len(pids))
    for variant in ("unsigned", "unknown_key", "altered"):
        want = "annotation_bad_signature" if variant == "altered" else f"annotation_{variant}"
        shas = [s for s, r in forged.items() if r == want]
        got = Counter(r for s in shas for r in dead_by_sha.get(s, ()))
        pids = sent[f"annotation:{variant}"]
        label = {"unsigned": "forged expert annotation (unsigned)",
                 "unknown_key": "forged expert annotation (attacker's key)",
                 "altered": "signed verdict altered to expert, other side"}[variant]
        counted = metric(review_metrics, "prefstream_annotations_refused_total", reason=want.removeprefix("annotation_"))
        row(label, len(shas), sum(1 for s in shas if want in dead_by_sha.get(s, ())),
            f"prefs.dlq {dict(got) or 'none'} (counted {counted:.0f})",
            poisoned(pids, lambda r: r["pair"]["chosen"] != targets[r["pair"]["pair_id"]]),
            all(dead_by_sha.get(s) == {want} for s in shas))
    # A downgrade that took would score (and curate) with v1; a gold model, which no one may announce
    # here, would make silver and flipped rows.
    by_v1 = [describe(r) for r in rows if r["model_version"] == v1]
    by_gold = [describe(r) for r in rows if r["split"] in ("silver", "flipped")]
    for role, reason, label, poison in (
            ("current", "stale", "announcement downgrade (v1's own, re-published)", by_v1),
            ("current", "unknown_key", "announcement downgrade (attacker's key)", by_v1),
            ("gold", "bad_signature", "announcement cross-role (v1's record as gold)", by_gold)):
        count = metric(worker_metrics, "prefstream_model_announcements_refused_total", role=role, reason=reason)
        row(label, n, int(count), f"refused: {reason} ({role})", poison, count >= n)
    dropped = metric(worker_metrics, "prefstream_uncommitted_records_dropped_total",
                     topic=settings.topic(topics.CURATED), reason="aborted")
    row("curated row of an aborted transaction", len(aborted), int(dropped),
        f"dropped by the shard writer: aborted (the broker delivered {delivered_aborted})",
        poisoned([p["pair_id"] for p in aborted],
                 lambda r: r["split"] == "verified_by_tool" or r["pair"]["chosen"] != CAPITAL_TRUTH),
        dropped >= len(aborted) and delivered_aborted == len(aborted))
    ok = [p for p in sent["exit_code"] if p in scored and scored[p][0] != "verified_by_tool"]
    control = next(pid for pid, good in cheats.items() if good)
    row("code candidate exits first (sys.exit(0), os._exit(0), fake pass)", len(sent["exit_code"]), len(ok),
        f"no harness token: not verified (routes {sorted({scored[p][0] for p in ok})}); the honest control "
        f"{scored.get(control, ('unscored',))[0]}",
        poisoned(sent["exit_code"], lambda r: r["split"] == "verified_by_tool"),
        len(ok) == len(sent["exit_code"]) and scored.get(control, ("",))[0] == "verified_by_tool")

    attack_pids = {p for v in sent.values() for p in v} | {p["pair_id"] for p in aborted} | set(cheats)
    known = attack_pids | {p["pair_id"] for p in honest}
    late_scored = [scored[p["pair_id"]] for p in late if p["pair_id"] in scored]
    unexplained_dead = [d for d in followers["dlq"].records if d["sha"] not in forged]
    return {
        "name": cfg.name, "kind": "poisoning", "tag": tag, "config": cfg.__dict__, "attacks": table,
        "poisoned_rows": len(all_poisoned),
        "serving": {
            "versions": {"v1": v1, "v2": v2},
            "before": {"info": metric(serving_before, "prefstream_model_info", current=v2, gold="none"),
                       "swaps_current": metric(serving_before, "prefstream_model_swaps_total", role="current")},
            "after": {"info": metric(worker_metrics, "prefstream_model_info", current=v2, gold="none"),
                      "swaps_current": metric(worker_metrics, "prefstream_model_swaps_total", role="current"),
                      "swaps_gold": metric(worker_metrics, "prefstream_model_swaps_total", role="gold")},
            "late_pairs": len(late), "late_scored": len(late_scored),
            "late_versions": sorted({(s[2], s[3] or "none") for s in late_scored}),
        },
        "honest": {"pairs": len(honest), "scored": sum(p["pair_id"] in scored for p in honest),
                   "routes": dict(Counter(scored[p["pair_id"]][0] for p in honest if p["pair_id"] in scored)),
                   "verified": len({p["pair_id"] for p in honest} & set(followers["verified"].records)),
                   "shard_rows": sum(r["pair"]["pair_id"] in {p["pair_id"] for p in honest} for r in rows)},
        "shards": {"rows": len(rows), "splits": dict(Counter(r["split"] for r in rows)),
                   "unknown_pairs": sorted({r["pair"]["pair_id"] for r in rows} - known)[:10],
                   "missing": sorted(set(followers["curated"].records)
                                     - {(r["pair"]["pair_id"], "gold" if r["split"] == "gold" else "routed")
                                        for r in rows})[:10]},
        "unexplained_dead_letters": unexplained_dead[:5], "answered": annotators.answered,
        "annotator_errors": annotators.errors[:5], "review_rc": review_rc, "worker_rc": worker_rc,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def check_poisoning(result: dict) -> None:
    from tests.chaos import render

    problems = [f"{r['attack']}: {r['poisoned_rows']} poisoned rows {r['examples']}" for r in result["attacks"]
                if r["poisoned_rows"]]
    problems += [f"{r['attack']}: refused {r['refused']} of {r['sent']}, not for the expected reason ({r['reason']})"
                 for r in result["attacks"] if not r["right_reason"]]
    sv = result["serving"]
    if sv["before"]["info"] != 1:
        problems.append(f"the worker did not serve v2 alone before the attacks: {sv}")
    if sv["after"]["info"] != 1 or sv["after"]["swaps_current"] != sv["before"]["swaps_current"] \
            or sv["after"]["swaps_gold"]:
        problems.append(f"the forged announcements changed what the worker serves: {sv}")
    if sv["late_scored"] != sv["late_pairs"] or sv["late_versions"] != [(sv["versions"]["v2"], "none")]:
        problems.append(f"pairs sent after the announcements were not all scored by v2 alone: {sv}")
    if result["shards"]["unknown_pairs"] or result["shards"]["missing"]:
        problems.append(f"shards: {result['shards']}")
    if result["unexplained_dead_letters"]:
        problems.append(f"dead letters of honest records: {result['unexplained_dead_letters']}")
    if result["honest"]["scored"] != result["honest"]["pairs"] or not result["honest"]["verified"]:
        problems.append(f"honest traffic did not flow: {result['honest']}")
    if result["worker_rc"] != 0:
        problems.append(f"the worker exited {result['worker_rc']}")
    assert not problems, "\n".join(problems) + "\n\n" + render([result])


@pytest.mark.integration
@needs_bwrap
@pytest.mark.parametrize("cfg", [pytest.param(POISON_SMALL, id="small"),
                                 pytest.param(POISON_LONG, id="long", marks=pytest.mark.slow)])
def test_poisoning_attacks_beside_honest_traffic_leave_no_poisoned_shard_row(settings, tmp_path, cfg):
    result = run_poisoning(settings, tmp_path, cfg)
    save(result, tmp_path)
    check_poisoning(result)
