"""Hostile input: every record a producer can send ends scored or in prefs.dlq with a reason, and the worker lives.

The unit tests drive the Pipeline with fakes (no broker, no model); the last test runs a real worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from schemas.exceptions import InvalidRecordError
from schemas.pairs import pair_from_json, validate_pair
from streams.exceptions import StageFailedError, UntrustedModelPathError
from streams.kafka import topics
from tests.helpers import FakeMessage, FakeScorer, decoded_outputs, fake_pipeline

BIG_NUMBER = "9" * 5000


def _msgs(values: list[bytes]) -> list[FakeMessage]:
    return [FakeMessage(v, key=f"k{i}".encode(), headers=[("trace", b"t%d" % i)], offset=100 + i)
            for i, v in enumerate(values)]


def _pair(i: int, **extra) -> bytes:
    return json.dumps({"pair_id": f"good-{i}", "prompt": f"Say something kind, number {i}.",
                       "chosen": f"You are doing great, {i}.", "rejected": "No."} | extra).encode()


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("raw_created_at", "reason"), [
    ("NaN", "invalid_value"), ("Infinity", "invalid_value"), ("-Infinity", "invalid_value"), ("1e300", "invalid_value"),
    (str(2**63), "invalid_value"), ("-1", "invalid_value"), (BIG_NUMBER, "invalid_number"),
    (BIG_NUMBER + ".5", "invalid_value"),  # a float literal that long parses to inf
])
def test_created_at_must_be_a_finite_epoch_in_range(raw_created_at, reason):
    value = '{"prompt":"x","chosen":"a","rejected":"b","created_at":' + raw_created_at + "}"
    with pytest.raises(InvalidRecordError) as err:
        pair_from_json(value.encode())
    assert err.value.reason == reason
    assert len(str(err.value)) < 400, "the message must show the value truncated"
    # And through the pipeline: the record is dead-lettered, the good one next to it is scored.
    out = decoded_outputs(fake_pipeline().process(_msgs([value.encode(), _pair(1)])))
    assert [d["reason"] for d in out["prefs.dlq"]] == [reason]
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["good-1"]


@pytest.mark.parametrize("field", ["chosen", "pair_id", "source", "label_source"])
def test_a_5000_digit_number_in_any_field_is_dead_lettered(field):
    value = ('{"prompt":"x","chosen":"a","rejected":"b","%s":%s}' % (field, BIG_NUMBER)).encode()  # noqa: UP031
    out = decoded_outputs(fake_pipeline().process(_msgs([value, _pair(1)])))
    assert [d["reason"] for d in out["prefs.dlq"]] == ["invalid_number"]
    assert "64 bits" in out["prefs.dlq"][0]["detail"]
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["good-1"]


@pytest.mark.parametrize("pair_id", ["x" * 129, "has space", "slash/and", "ünïcode", "new\nline", "p:expert", "p:re"])
def test_pair_ids_are_short_plain_and_never_a_derived_id(pair_id):
    with pytest.raises(InvalidRecordError, match="pair_id") as err:
        validate_pair({"pair_id": pair_id, "prompt": "q", "chosen": "a", "rejected": "b"})
    assert err.value.reason == "invalid_pair_id"
    assert "use 1 to 128" in str(err.value) or "reserved" in str(err.value), "the message says the fix"


def test_pair_ids_within_the_rules_are_kept():
    for pid in ("a", "x" * 128, "gen-0-1", "app:2026.11:abc_DEF", "p:review", "p:expert2"):
        assert validate_pair({"pair_id": pid, "prompt": "q", "chosen": "a", "rejected": "b"})["pair_id"] == pid


# ---------------------------------------------------------------------------------------------- isolation
def test_one_poisoned_record_is_bisected_out_of_a_score_batch():
    scorer = FakeScorer(poison="POISON")
    values = [_pair(i) for i in range(16)]
    values[11] = json.dumps({"pair_id": "bad-11", "prompt": "q", "chosen": "POISON", "rejected": "b"}).encode()
    out = decoded_outputs(fake_pipeline(scorer).process(_msgs(values)))
    (dead,) = out["prefs.dlq"]
    assert (dead["reason"], dead["processor"], dead["error_type"]) == ("processing_error", "score", "RuntimeError")
    assert "tokenizer choked" in dead["detail"]
    assert dead["original_value"] == values[11] and dead["source_offset"] == 111
    assert dead["original_headers"] == {"trace": b"t11"} and dead["source_topic"] == "prefs.raw"
    assert sorted(s["pair"]["pair_id"] for s in out["prefs.scored"]) == sorted(f"good-{i}" for i in range(16) if i != 11)
    assert scorer.calls <= 1 + 2 * 4, f"bisection of 16 should take at most 9 calls, took {scorer.calls}"


def test_a_stage_failing_for_every_record_retries_the_batch_instead_of_dead_lettering_it():
    scorer = FakeScorer()
    scorer.score = lambda pairs: (_ for _ in ()).throw(RuntimeError("model file missing"))
    with pytest.raises(StageFailedError, match="all 8 records"):
        fake_pipeline(scorer).process(_msgs([_pair(i) for i in range(8)]))


def test_a_new_stage_is_a_class_and_one_line_in_the_list_and_is_isolated_like_the_others():
    from streams.runtime.processors.stage import Stage

    class Length(Stage[int]):
        name = timer = "length"

        def run(self, items):
            if any("number 3" in i.pair["conversation"][0]["content"] for i in items):
                raise ValueError("cannot measure this one")
            return [len(i.pair["chosen"]) for i in items]

    read: dict[str, int] = {}

    class Reader(Stage[None]):
        name = timer = "reader"

        def run(self, items):
            read.update({i.pair["pair_id"]: i.found(Length) for i in items})  # typed by Length's result
            return [None] * len(items)

    pipeline = fake_pipeline()
    pipeline.stages += [Length(), Reader()]
    out = decoded_outputs(pipeline.process(_msgs([_pair(i) for i in range(6)])))
    (dead,) = out["prefs.dlq"]
    assert (dead["processor"], dead["error_type"], dead["source_offset"]) == ("length", "ValueError", 103)
    assert read == {f"good-{i}": len(f"You are doing great, {i}.") for i in (0, 1, 2, 4, 5)}
    assert sorted(s["pair"]["pair_id"] for s in out["prefs.scored"]) == [f"good-{i}" for i in (0, 1, 2, 4, 5)]


@pytest.mark.parametrize("stage", ["ingest", "label", "embed", "verify", "route"])
def test_any_exception_in_any_stage_dead_letters_only_that_record(stage, monkeypatch):
    pipeline = fake_pipeline()
    bad = "Say something kind, number 3."

    def boom(texts):
        if any(bad in t for t in texts):
            raise RecursionError("maximum recursion depth exceeded")

    if stage == "ingest":
        decode = pipeline.codec.decode
        monkeypatch.setattr(pipeline.codec, "decode", lambda n, v, h=None, t="": boom([v.decode()]) or decode(n, v, h, t))
    elif stage == "label":
        label = pipeline.labeler.label
        monkeypatch.setattr(pipeline.labeler, "label", lambda ps, d=None: boom([p["conversation"][0]["content"] for p in ps])
                            or label(ps, d))
    elif stage == "embed":
        from streams.runtime.processors.embedder import EmbedStage

        class Failing:  # the retrieval embedding only (the labeler keeps its own reference)
            def embed(self, texts, inner=pipeline.embedder):
                return boom(texts) or inner.embed(texts)

        (embedding,) = [s for s in pipeline.stages if isinstance(s, EmbedStage)]
        monkeypatch.setattr(embedding, "embedder", Failing())
    elif stage == "verify":
        import streams.runtime.processors.verifiers as verifiers

        verify_batch = verifiers.verify_batch
        monkeypatch.setattr(verifiers, "verify_batch", lambda ps: boom([p["conversation"][0]["content"] for p in ps])
                            or verify_batch(ps))
    else:
        import streams.runtime.pipeline as worker

        scored_record = worker.scored_record
        monkeypatch.setattr(worker, "scored_record", lambda p, s, d: boom([p["conversation"][0]["content"]])
                            or scored_record(p, s, d))
    out = decoded_outputs(pipeline.process(_msgs([_pair(i) for i in range(6)])))
    (dead,) = out["prefs.dlq"]
    assert dead["processor"] == stage and dead["error_type"] == "RecursionError" and dead["source_offset"] == 103
    assert sorted(s["pair"]["pair_id"] for s in out["prefs.scored"]) == [f"good-{i}" for i in (0, 1, 2, 4, 5)]


def test_a_batch_that_fails_outside_the_stages_is_processed_record_by_record(monkeypatch):
    pipeline = fake_pipeline()
    dedupe = pipeline.ingestor.dedupe

    def picky(results):
        if len(results) > 1:
            raise TypeError("a bug that only shows in batches")
        return dedupe(results)

    monkeypatch.setattr(pipeline.ingestor, "dedupe", picky)
    with pytest.raises(TypeError):
        pipeline.process(_msgs([_pair(i) for i in range(3)]))
    out = decoded_outputs(pipeline.process_each(_msgs([_pair(i) for i in range(3)])))
    assert len(out["prefs.scored"]) == 3 and "prefs.dlq" not in out


# ---------------------------------------------------------------------------------------------- math verifier
HOSTILE_MATH = [
    "What is " + "+".join(["1"] * 5000) + "?",
    "What is ((10^100)^100)^100^100?",
    "What is 9^9^9^9?",
    "What is " + "(" * 3000 + "1" + ")" * 3000 + "?",
    f"What is {BIG_NUMBER} * {BIG_NUMBER}?",
    "What is 2^100 * 2^100 * 2^100 * 2^100 * 2^100 * 2^100 * 2^100 * 2^100 * 2^100 * 2^100 * 2^100?",
]


@pytest.mark.parametrize("prompt", HOSTILE_MATH, ids=["5000 terms", "tower", "tower2", "deep", "5000 digits", "big product"])
def test_the_math_verifier_cannot_decide_hostile_expressions_and_is_quick(prompt):
    from streams.runtime.processors.verifiers import expected_answer, verify

    pair = {"conversation": [{"role": "user", "content": prompt}], "chosen": "2", "rejected": "3",
            "objectivity": "factual", "task_category": "arithmetic", "metadata": {}}
    started = time.perf_counter()
    assert expected_answer(pair) is None
    assert verify(pair) is None
    assert time.perf_counter() - started < 0.5
    # A legitimate pair with a hostile question is scored, not dead-lettered.
    value = json.dumps({"pair_id": "m-1", "prompt": prompt, "chosen": "2", "rejected": "3", "objectivity": "factual",
                        "task_category": "arithmetic"}).encode()
    out = decoded_outputs(fake_pipeline().process(_msgs([value])))
    assert "prefs.dlq" not in out and out["prefs.scored"][0]["pair"]["pair_id"] == "m-1"


def test_the_math_verifier_still_checks_plain_arithmetic_and_huge_final_numbers():
    from streams.runtime.processors.verifiers import expected_answer, final_number

    pair = {"conversation": [{"role": "user", "content": "What is 2^10 + (3 * 4)?"}], "metadata": {}}
    assert expected_answer(pair) == 1036
    assert final_number("so it is " + BIG_NUMBER) is None and final_number("It is 1,500 km.") == 1500
    assert expected_answer({"conversation": pair["conversation"], "metadata": {"answer": BIG_NUMBER}}) is None


# ---------------------------------------------------------------------------------------------- trust
def _vouching_pair(source: str) -> bytes:
    # The producer claims the answer is 43 and that "43" is right; the prompt's own arithmetic says 42.
    return json.dumps({"pair_id": f"v-{source}", "prompt": "What is 6 * 7?", "chosen": "43", "rejected": "42",
                       "source": source, "objectivity": "factual", "task_category": "arithmetic",
                       "metadata": {"answer": "43"}}).encode()


def test_an_unsigned_vouch_is_ignored_whatever_source_the_pair_claims():
    # Signed vouches: tests/test_provenance.py. Unsigned, the answer is ignored for every source, the
    # demo generator's included: the prompt's own expression (42) decides, and the label is flipped.
    # The same pair from two sources: content de-duplication (off here) would dead-letter the second.
    out = decoded_outputs(fake_pipeline(producer_keys="", duplicate_retention_s=0).process(
        _msgs([_vouching_pair("prefstream-generate"), _vouching_pair("some-app")])))
    routes = {s["pair"]["pair_id"]: (s["route"], s["route_reason"]) for s in out["prefs.scored"]}
    assert routes == {f"v-{src}": ("verified_by_tool", "math verifier: rejected is correct")
                      for src in ("prefstream-generate", "some-app")}
    curated = {c["pair"]["pair_id"]: c for c in out["prefs.curated"]}
    assert curated["v-prefstream-generate"]["pair"]["chosen"] == "42"


# ---------------------------------------------------------------------------------------------- sizes
def test_an_original_too_large_for_the_dlq_is_kept_truncated_with_its_hash_and_size():
    from streams.runtime.outputs import OUTPUT_LIMIT

    value = b'{"prompt": "' + b"x" * (9 << 20) + b'"'
    out = fake_pipeline().process(_msgs([value]))
    assert len(out[0][2]) <= OUTPUT_LIMIT
    (dead,) = decoded_outputs(out)["prefs.dlq"]
    assert dead["original_truncated"] and dead["original_size"] == len(value)
    assert dead["original_sha256"] == hashlib.sha256(value).hexdigest()
    assert value.startswith(dead["original_value"]) and len(dead["original_value"]) > 7 << 20


# Each text field just under its 1 MiB limit: 4 MiB of conversation and responses, 5 MiB of metadata.
FAT_TEXT = "y" * ((1 << 20) - 100)
FAT_PAIR = json.dumps({"pair_id": "fat", "conversation": [{"role": "user", "content": FAT_TEXT}] * 3,
                       "chosen": FAT_TEXT, "rejected": "b", "metadata": {f"m{i}": FAT_TEXT for i in range(5)}}).encode()


def test_metadata_counts_toward_the_pair_size_limit():
    out = decoded_outputs(fake_pipeline().process(_msgs([FAT_PAIR, _pair(1)])))
    (dead,) = out["prefs.dlq"]
    assert (dead["reason"], dead["processor"]) == ("too_large", "ingest")
    assert "metadata" in dead["detail"] and "4,194,304" in dead["detail"]
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["good-1"]
    # Metadata alone past the limit (six values under the per-field limit) is too large as well.
    small = {"prompt": "q", "chosen": "a", "rejected": "b"}
    with pytest.raises(InvalidRecordError) as exc:
        validate_pair(small | {"metadata": {f"k{i}": FAT_TEXT for i in range(6)}})
    assert exc.value.reason == "too_large"
    assert validate_pair(small | {"metadata": {f"k{i}": FAT_TEXT for i in range(3)}})  # 3 MiB fits


def test_an_output_larger_than_the_topic_takes_is_dead_lettered_not_sent(monkeypatch):
    import schemas.pairs

    # A pair limit above what the topics take (a misconfiguration): the encode guard still holds.
    monkeypatch.setattr(schemas.pairs, "MAX_PAIR_BYTES", 16 << 20)
    out = decoded_outputs(fake_pipeline().process(_msgs([FAT_PAIR, _pair(1)])))
    (dead,) = out["prefs.dlq"]
    assert (dead["reason"], dead["processor"]) == ("too_large", "encode")
    assert "ScoredPair" in dead["detail"] and "shorten" in dead["detail"]
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["good-1"]


def test_review_task_neighbours_are_trimmed_to_fit_the_topic():
    from schemas.pairs import clip
    from schemas.records import SimilarPair
    from streams.runtime.outputs import OUTPUT_LIMIT, review_task
    from streams.runtime.processors.router import Route
    from streams.runtime.retrieval.index import NEIGHBOUR_TEXT_CHARS

    big = clip("z" * 100_000, NEIGHBOUR_TEXT_CHARS)
    assert len(big) < 4100, "neighbour texts are clipped when indexed"
    neighbours = [SimilarPair(pair_id=f"n{i}", prompt=big, chosen=big, rejected=big, label_source="human", similarity=0.9)
                  for i in range(8)]
    pair = {"pair_id": "p", "created_at": 0}
    score = {"p": 0.3, "reward_chosen": 0.0, "reward_rejected": 1.0, "model_version": "bootstrap"}
    assert len(review_task(pair, score, Route("review", "mispredicted", 8), neighbours, 0, 1000, "t1")["similar"]) == 8
    task = review_task(pair, score, Route("review", "mispredicted", 8), neighbours, 0, OUTPUT_LIMIT - 40_000, "t1")
    assert 0 < len(task["similar"]) < 8, "only the most similar that fit are kept"


# ---------------------------------------------------------------------------------------------- model store
VERSION = "current-20261130-120000-abc123"


@pytest.mark.parametrize("case", ["elsewhere", "dotdot", "symlink", "bad-name", "relative"])
def test_announcements_outside_the_models_store_are_refused_and_counted(case, tmp_path: Path):
    from streams.runtime import metrics
    from streams.runtime.processors.scorer import load_announced

    store = tmp_path / "models"
    (store / "versions").mkdir(parents=True)
    outside = tmp_path / "evil"
    (outside / VERSION).mkdir(parents=True)
    version, path = VERSION, str(outside / VERSION)
    if case == "dotdot":
        path = str(store / "versions" / ".." / ".." / "evil" / VERSION)
    elif case == "symlink":
        (store / "versions" / VERSION).symlink_to(outside / VERSION)
        path = str(store / "versions" / VERSION)
    elif case == "bad-name":
        version = "../../evil/" + VERSION
        path = str(store / "versions" / version)
    elif case == "relative":
        path = f"versions/{VERSION}"
    record = {"role": "current", "version": version, "path": path, "manifest_sha256": "0"}
    before = metrics.ANNOUNCEMENTS_REFUSED.labels("current", "outside_store")._value.get()
    with pytest.raises(UntrustedModelPathError):
        load_announced(record, models_dir=store)
    assert metrics.ANNOUNCEMENTS_REFUSED.labels("current", "outside_store")._value.get() == before + 1


def test_an_announcement_of_a_version_in_the_store_is_accepted(tmp_path: Path):
    from streams.runtime.processors.scorer import resolve_announced
    from trainers.storage.registry import ModelStore

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    store = ModelStore(tmp_path / "models")
    info = store.publish(src, "current")
    # The announced path is never used: the version is found in the worker's own store.
    record = {"version": info.version, "path": str(tmp_path / "elsewhere"),
              "manifest_sha256": store.manifest_sha256(info.version)}
    assert resolve_announced(record, store) == info.path
    # The same store reached through a link to the store itself is still the store.
    (tmp_path / "link").symlink_to(tmp_path / "models")
    assert resolve_announced(record, ModelStore(tmp_path / "link")).resolve() == info.path.resolve()


# ---------------------------------------------------------------------------------------------- the fault test
def _hostile_records() -> list[tuple[str, bytes, str | None]]:
    """(name, value, expected DLQ reason; None: must be scored instead)."""
    base = {"prompt": "x", "chosen": "a", "rejected": "b"}

    def pj(**extra) -> bytes:
        return json.dumps(base | extra).encode()

    def created(raw: str) -> bytes:
        return b'{"prompt":"x","chosen":"a","rejected":"b","created_at":%s}' % raw.encode()

    return [
        ("nan", created("NaN"), "invalid_value"),
        ("infinity", created("Infinity"), "invalid_value"),
        ("1e300", created("1e300"), "invalid_value"),
        ("int64", created(str(2**64)), "invalid_value"),
        ("5000 digits", created(BIG_NUMBER), "invalid_number"),
        ("long id", pj(pair_id="x" * 200), "invalid_pair_id"),
        ("odd id", pj(pair_id="a b/c"), "invalid_pair_id"),
        ("derived id", pj(pair_id="good-1:expert"), "invalid_pair_id"),
        ("broken json", b'{"prompt": "q", "chosen": ', "invalid_json"),
        ("invalid utf-8", b'{"prompt": "q", "chosen": "ok", "rejected": "\xff\xfe"}', "invalid_utf8"),
        ("deep json", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
        ("10000 turns", json.dumps({"conversation": [{"role": "user", "content": "hi"}] * 10_000, "chosen": "a",
                                    "rejected": "b"}).encode(), "too_large"),
        ("5000 terms", pj(pair_id="h-terms", prompt="What is " + "+".join(["1"] * 5000) + "?",
                          objectivity="factual", task_category="arithmetic"), None),
        ("tower", pj(pair_id="h-tower", prompt="What is ((10^100)^100)^100^100?", objectivity="factual",
                     task_category="arithmetic"), None),
        ("huge answer", pj(pair_id="h-answer", metadata={"answer": BIG_NUMBER}), None),
    ]


@pytest.mark.integration
def test_a_worker_takes_hostile_input_and_scores_every_good_pair_once(settings):
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config
    from tests.helpers import WorkerProcess, read_topic, wait_for_scored

    worker = WorkerProcess(settings).start()
    try:
        hostile = _hostile_records()
        good = [_pair(i) for i in range(50)]
        producer = Producer(producer_config(settings))
        raw = settings.topic(topics.RAW)
        sent_hostile = {}
        for i, value in enumerate(good):
            producer.produce(raw, value=value, key=f"good-{i}".encode())
            if i < len(hostile):
                name, bad, _ = hostile[i]
                producer.produce(raw, value=bad, key=f"bad-{i}".encode())
                sent_hostile[hashlib.sha256(bad).hexdigest()] = name
        producer.produce(raw, value=good[7], key=b"good-7")  # a duplicate id
        assert producer.flush(30) == 0
        must_score = {f"good-{i}" for i in range(50)} | {"h-terms", "h-tower", "h-answer"}
        scored = wait_for_scored(settings, must_score, timeout=90)
        expected = Counter(reason for _, _, reason in hostile if reason)
        deadline = time.monotonic() + 30
        while True:
            dlq = read_topic(settings, topics.DLQ, "DeadLetter", idle=1.0)
            if len(dlq) >= sum(expected.values()) or time.monotonic() > deadline:
                break
        got = {sent_hostile.get(d["original_sha256"], "?"): d["reason"] for d in dlq}
        assert got == {name: reason for name, _, reason in hostile if reason}
        assert all(d["detail"] and d["processor"] and d["source_topic"] == raw and d["error_type"] for d in dlq)
        ids = Counter(s["pair"]["pair_id"] for s in read_topic(settings, topics.SCORED, "ScoredPair", idle=1.0))
        assert all(ids[i] == 1 for i in must_score), f"scored more than once: {[i for i in must_score if ids[i] != 1]}"
        assert len(scored) >= len(must_score)
        assert worker.proc.poll() is None, "the worker must never exit because of a record"
    finally:
        assert worker.stop() == 0
