"""The stream pipeline against the real embedded broker and Redis, with real worker processes."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from schemas.pairs import validate_pair
from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.review import audit
from streams.runtime.processors.router import RouterPolicy, route
from streams.settings import WorkerSettings
from tests.helpers import (
    WorkerProcess,
    assert_exactly_once_in_shards,
    hh_valid_pairs,
    objective_pairs,
    produce,
    read_topic,
    routes_counted,
    short_pairs,
    wait_for_scored,
)

pytestmark = pytest.mark.integration

ROUTES = {"review", "silver", "flipped", "verified_by_tool", "dropped"}


def last_per_pair(records: list[dict]) -> dict[str, dict]:
    out = {}
    for r in records:
        out[r["pair"]["pair_id"]] = r
    return out


# `make test` runs the small sizes; `make chaos` (tests marked slow) the full ones.
E2E_SIZES = [pytest.param(300, id="small"), pytest.param(1000, id="long", marks=pytest.mark.slow)]
CRASH_SIZES = [pytest.param(1000, id="small"), pytest.param(3000, id="long", marks=pytest.mark.slow)]


@pytest.mark.parametrize("half", E2E_SIZES)
def test_end_to_end_every_pair_accounted_for(settings, half):
    worker = WorkerProcess(settings).start()
    try:
        # Half real HH-RLHF conversations, half objective pairs with known answers (long: 2,000 pairs in all).
        objective = objective_pairs(half)
        pairs = hh_valid_pairs(half) + objective
        ids = produce(settings, pairs)
        scored = last_per_pair(wait_for_scored(settings, ids, timeout=900))
        assert set(scored) == ids
        policy = RouterPolicy.from_settings(WorkerSettings())
        for pid, rec in scored.items():
            assert rec["route"] in ROUTES and rec["route_reason"]
            assert rec["model_version"] == "bootstrap" and 0.0 <= rec["p"] <= 1.0
            for attr in ("task_category", "objectivity", "controversiality", "expected_attributes", "annotation_guideline"):
                assert rec["pair"][attr], f"{pid} lacks {attr}"
            if rec["route"] != "verified_by_tool":  # the policy, recomputed from the record's own scores
                assert route(rec["p"], rec["gold_p"], None, policy).kind == rec["route"]
        for pair in objective:
            rec = scored[pair["pair_id"]]
            assert rec["route"] == "verified_by_tool", rec["route_reason"]
            assert ("rejected is correct" in rec["route_reason"]) == (pair["metadata"]["truth"] == "rejected")
        review = read_topic(settings, topics.REVIEW, "ReviewTask")
        curated = read_topic(settings, topics.CURATED, "CuratedPair")
        by_route = Counter(r["route"] for r in scored.values())
        audits = [t for t in review if audit.kind_of(t) is not None]  # a share of the curated pairs, blind
        assert len(review) - len(audits) == by_route["review"]
        assert len(curated) == by_route["verified_by_tool"] + by_route["silver"] + by_route["flipped"]
        assert {t["pair"]["pair_id"] for t in audits} <= {c["pair"]["pair_id"] for c in curated}
        assert {t["pair"]["pair_id"] for t in review} | {c["pair"]["pair_id"] for c in curated} <= ids
        for task in review:
            k = 8 if task["p"] < 0.5 else int(8 * (1 - task["p"]))
            assert len(task["similar"]) == min(k, len(task["similar"])) <= k
        assert any(len(t["similar"]) == 8 for t in review), "mispredicted pairs should come with 8 similar pairs"
        by_id = {p["pair_id"]: p for p in objective}
        for c in curated:  # flipped verdicts are stored the right way round for training
            truth = by_id[c["pair"]["pair_id"]]
            assert c["pair"]["chosen"].endswith(f"= {eval(truth['prompt'][8:-1].replace(' ', ''))}.")
        assert_exactly_once_in_shards(settings, {c["pair"]["pair_id"] for c in curated})
        text = worker.metrics()
        assert f'prefstream_records_in_total{{topic="{settings.topic(topics.RAW)}"}} {float(len(ids))}' in text
        assert "prefstream_routes_total" in text and "prefstream_processing_seconds_bucket" in text
        for stage in ("ingest", "score", "label", "verify", "route", "commit"):
            assert f'prefstream_stage_seconds_count{{stage="{stage}"}}' in text, stage
        assert routes_counted(settings) == by_route  # the stats page's routes: each pair once, as its batch committed
    finally:
        assert worker.stop() == 0


def bad_records(settings, n: int, huge: int = 10) -> list[tuple[bytes | None, bytes, list]]:
    """Malformed and hostile records of every kind, with the expected DLQ reason (None: a duplicate).

    Exactly ``huge`` of them are 5 MB texts: each is kept whole in prefs.raw and prefs.dlq (in the
    memory-only broker), so their count is fixed rather than a random tenth of ``n``.
    """
    codec = ValueCodec()
    good = validate_pair({"prompt": "dup?", "chosen": "yes", "rejected": "no", "pair_id": "dup-1"})
    avro_value, avro_headers = codec.encode("PreferencePair", good, "x")
    scored_value, scored_headers = codec.encode("ModelVersion", {
        "role": "current", "version": "v", "path": "/x", "parent": None, "manifest_sha256": "0", "metrics": {},
        "action": "promote", "reason": "", "announced_at": 0}, "x")
    kinds = [
        (b'{"prompt": "q", "chosen": ', [], "invalid_json"),
        (json.dumps({"prompt": "q", "chosen": 5, "rejected": "b"}).encode(), [], "wrong_type"),
        (json.dumps({"prompt": "q", "chosen": "a"}).encode(), [], "missing_field"),
        (b'{"prompt": "q", "chosen": "ok", "rejected": "\xff\xfe"}', [], "invalid_utf8"),
        (scored_value, scored_headers, "wrong_schema"),
        (b"\x00\x01\x02 binary without a header", [], "unknown_schema"),
        (avro_value[:-2], avro_headers, "invalid_avro"),
        (json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}).encode(), [], "identical_responses"),
        (avro_value, avro_headers, None),
    ]
    big = (json.dumps({"prompt": "q", "chosen": "x" * (5 << 20), "rejected": "b"}).encode(), [], "too_large")
    rng = random.Random(0)
    records = [rng.choice(kinds) for _ in range(n - huge)] + [big] * huge
    rng.shuffle(records)
    return records


def test_bad_input_goes_to_the_dlq_and_valid_pairs_still_flow(settings):
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config

    worker = WorkerProcess(settings).start()
    try:
        bad = bad_records(settings, 1000)
        good = [validate_pair({"prompt": f"Capital number {i}?", "chosen": f"Answer {i}.", "rejected": "No."})
                for i in range(150)]
        prod = Producer(producer_config(settings))
        raw = settings.topic(topics.RAW)
        expected = Counter()
        codec = ValueCodec()
        for i, (value, headers, reason) in enumerate(bad):
            prod.produce(raw, value=value, headers=headers, key=f"bad-{i}".encode())
            if reason:
                expected[reason] += 1
            if i % 7 == 0 and good:
                pair = good.pop()
                v, h = codec.encode("PreferencePair", pair, raw)
                prod.produce(raw, value=v, headers=h, key=pair["pair_id"].encode())
        for pair in good:
            v, h = codec.encode("PreferencePair", pair, raw)
            prod.produce(raw, value=v, headers=h, key=pair["pair_id"].encode())
        assert prod.flush(30) == 0
        valid_ids = {f"Capital number {i}?" for i in range(150)}
        deadline = time.monotonic() + 180
        while True:
            dlq = read_topic(settings, topics.DLQ, "DeadLetter", idle=2)
            recs = read_topic(settings, topics.SCORED, "ScoredPair", idle=2)
            prompts = {r["pair"]["conversation"][0]["content"] for r in recs}
            if (len(dlq) >= sum(expected.values()) and valid_ids | {"dup?"} <= prompts) or time.monotonic() > deadline:
                break
        assert Counter(d["reason"] for d in dlq) == expected
        for d in dlq:
            assert d["source_topic"] == raw and d["source_offset"] >= 0 and d["detail"]
            assert d["original_value"] is not None
        assert valid_ids | {"dup?"} <= prompts
        assert sum(r["pair"]["pair_id"] == "dup-1" for r in recs) == 1, "duplicates must be dropped"
        assert worker.proc.poll() is None, "the worker must survive hostile input"
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("n", CRASH_SIZES)
def test_kill_9_three_times_loses_and_duplicates_nothing(settings, n):
    # n short pairs + n/10 objective ones; the three kills land 2-6 s apart whatever n is.
    pairs = short_pairs(n, "crash") + objective_pairs(n // 10, seed=7)
    cut1, cut2 = len(pairs) // 3, 2 * len(pairs) // 3
    ids = {p["pair_id"] for p in pairs}
    worker = WorkerProcess(settings, worker_id="crashy").start()
    produced = produce(settings, pairs[:cut1])
    rng = random.Random(1)
    for batch in (pairs[cut1:cut2], pairs[cut2:]):
        time.sleep(rng.uniform(2, 6))
        worker.kill9()
        produced |= produce(settings, batch)
        worker = WorkerProcess(settings, worker_id="crashy").start()
    time.sleep(rng.uniform(2, 6))
    worker.kill9()
    worker = WorkerProcess(settings, worker_id="crashy").start()
    try:
        assert produced == ids
        records = wait_for_scored(settings, ids, timeout=600)
        counts = Counter(r["pair"]["pair_id"] for r in records)
        dupes = [k for k, v in counts.items() if v > 1]
        assert not dupes, f"{len(dupes)} pairs appear twice in prefs.scored (read_committed), e.g. {dupes[:3]}"
        curated = read_topic(settings, topics.CURATED, "CuratedPair")
        assert len({c["pair"]["pair_id"] for c in curated}) == len(curated)
        assert_exactly_once_in_shards(settings, {c["pair"]["pair_id"] for c in curated})
    finally:
        worker.stop()


def test_hot_swap_under_load_and_corrupt_version_refused(settings):
    from streams.kafka.announce import Announcer
    from trainers.scoring.model import RewardModel
    from trainers.storage.registry import ModelStore

    store = ModelStore(settings.models_dir)
    model_dir = RewardModel.default(max_length=64, seed=5).save(settings.models_dir.parent / "candidate")
    worker = WorkerProcess(settings).start()
    try:
        first = short_pairs(400, "before")
        produce(settings, first)
        wait_for_scored(settings, {p["pair_id"] for p in first[:20]})  # the stream is flowing: swap mid-stream
        v1 = store.publish(model_dir, "current", announce=Announcer(settings))
        second = short_pairs(600, "after")
        produce(settings, second)
        records = wait_for_scored(settings, {p["pair_id"] for p in first + second}, timeout=300)
        versions = Counter(r["model_version"] for r in records)
        assert set(versions) == {"bootstrap", v1.version}, versions
        last_seen: dict[int, str] = {}
        for r in sorted(records, key=lambda r: (r["_partition"], r["_offset"])):
            if last_seen.get(r["_partition"]) == v1.version:
                assert r["model_version"] == v1.version, "a partition went back to the old model"
            last_seen[r["_partition"]] = r["model_version"]
        assert len(records) == len(first) + len(second)

        # A corrupt version is announced: it is refused and v1 keeps serving.
        v2 = store.publish(model_dir, "current", promote=False)
        weights = v2.path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
        Announcer(settings)(store.version_record(v2.version, "current", "promote", "test"))
        third = short_pairs(200, "corrupt")
        produce(settings, third)
        more = wait_for_scored(settings, {p["pair_id"] for p in third}, timeout=300)
        assert {r["model_version"] for r in more if r["pair"]["pair_id"].startswith("corrupt")} == {v1.version}
        deadline = time.monotonic() + 30
        while 'prefstream_model_swap_failures_total{role="current"} 1.0' not in worker.metrics():
            assert time.monotonic() < deadline, "the corrupt version was not counted as a failed swap"
            time.sleep(0.5)
    finally:
        assert worker.stop() == 0


def test_dlq_list_and_replay_resend_the_original_bytes(settings):
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config
    from streams.kafka.deadletter import dead_letter
    from streams.kafka.reader import TopicReader
    from tests.helpers import run_cli

    class Msg:  # what the worker saw: the record as it came off prefs.raw
        def __init__(self, value):
            self._v = value

        def key(self):
            return b"k1"

        def value(self):
            return self._v

        def headers(self):
            return [("h", b"1")]

        def topic(self):
            return settings.topic(topics.RAW)

        def partition(self):
            return 0

        def offset(self):
            return 7

    originals = [b'{"prompt": "q", "chosen": ', b'{"prompt": "fixed later", "chosen": "a", "rejected": "b"}']
    codec, prod = ValueCodec(), Producer(producer_config(settings))
    for value, reason in zip(originals, ["invalid_json", "missing_field"], strict=True):
        v, h = codec.encode("DeadLetter", dead_letter(Msg(value), reason, "test", "ingest"), settings.topic(topics.DLQ))
        prod.produce(settings.topic(topics.DLQ), value=v, headers=h)
    prod.flush(10)
    listing = run_cli(["dlq", "list", "--json"], settings)
    assert [json.loads(line)["reason"] for line in listing.stdout.splitlines()] == ["invalid_json", "missing_field"]
    run_cli(["dlq", "replay", "--reason", "missing_field"], settings)
    # A dead letter that kept only a truncated original is listed but never replayed.
    truncated = dead_letter(Msg(b'{"prompt": "cut'), "too_large", "test", "ingest") | {"original_truncated": True}
    v, h = codec.encode("DeadLetter", truncated, settings.topic(topics.DLQ))
    prod.produce(settings.topic(topics.DLQ), value=v, headers=h)
    prod.flush(10)
    skipped = run_cli(["dlq", "replay", "--reason", "too_large"], settings)
    assert "replayed 0 dead letter(s)" in skipped.stderr and "not replayed" in skipped.stderr
    with TopicReader(settings.topic(topics.RAW), "PreferencePair", settings) as reader:
        msgs = list(reader.messages(idle_timeout=3))
    assert [(m.key(), m.value(), m.headers()) for m in msgs] == [(b"k1", originals[1], [("h", b"1")])]
