"""Who wrote a record is proven by a key, never declared by the record (docs/design.md, "Who can write what").

The attacks: a producer claiming the demo generator's source to vouch for a wrong answer; an Annotation
written straight to prefs.annotations with ``expert: true``; an old announcement re-published to
models.versions, and the same record claiming the gold role. Each is refused on the embedded stack, the
legitimate signed paths still work, and the refusals are counted on /metrics.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import urllib.request

import pytest
import redis
from prometheus_client import REGISTRY

from schemas.pairs import pair_from_json
from schemas.wire import ValueCodec
from streams import signing
from streams.exceptions import ConfigError
from streams.kafka import topics
from streams.keys import (
    GENERATOR_KEY_ID,
    GENERATOR_SOURCE,
    announce_signer,
    announce_verifiers,
    ensure_local_keys,
    generator_signer,
    producer_keys_text,
    review_keys,
)
from streams.review.provenance import AnnotationKeys
from streams.runtime.curation.trust import ProducerKeyring, sign_pair
from streams.settings import ReviewSettings, Settings, WorkerSettings
from tests.helpers import (
    FakeMessage,
    WorkerProcess,
    aggregate_until_dead_letters,
    auth,
    decoded_outputs,
    fake_pipeline,
    make_client,
    publish,
    raw_announcements,
    read_topic,
    review_task,
    vouching_pair,
    wait_for_scored,
)

SECRET = "s" * 40
OTHER_SECRET = "o" * 40


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def sample(metrics_text: str, series: str) -> float:
    """The value of ``series`` (name and labels as /metrics prints them) in a /metrics page; 0 when absent."""
    line = next((x for x in metrics_text.splitlines() if x.startswith(series + " ")), None)
    return float(line.split()[-1]) if line else 0.0


# ---------------------------------------------------------------------------------------------- signatures
def test_the_canonical_record_is_sorted_compact_utf8_after_a_schema_line():
    assert signing.canonical("Annotation", {"b": 1, "a": "é", "c": None}) == \
        b'prefstream:Annotation:v1\n{"a":"\xc3\xa9","b":1,"c":null}'


def test_hmac_and_ed25519_signatures_verify_and_any_change_breaks_them():
    record = {"role": "current", "version": "v", "announced_at": 1}
    private, public = signing.new_ed25519()
    signer = signing.ed25519_signer(private, "test")
    verifiers = signing.ed25519_verifiers(public, "test")
    hkey = signing.hmac_key(SECRET, "test")
    for key, lookup in ((signer, verifiers.get), (hkey, {hkey.key_id: hkey}.get)):
        headers = signing.sign_headers("ModelVersion", record, key)
        assert signing.check("ModelVersion", record, headers, lookup) is None
        assert signing.check("ModelVersion", record | {"role": "gold"}, headers, lookup) == signing.BAD_SIGNATURE
        assert signing.check("Annotation", record, headers, lookup) == signing.BAD_SIGNATURE  # another schema
        assert signing.check("ModelVersion", record, [], lookup) == signing.UNSIGNED
        assert signing.check("ModelVersion", record, headers, {}.get) == signing.UNKNOWN_KEY
        garbled = [(k, b"%%%not base64" if k == signing.SIGNATURE_HEADER else v) for k, v in headers]
        assert signing.check("ModelVersion", record, garbled, lookup) == signing.BAD_SIGNATURE
    # A worker holds the public key only: it verifies, it cannot sign.
    assert not hasattr(verifiers[signer.key_id], "sign")


@pytest.mark.parametrize(("text", "match"), [
    ("just-a-secret", "entry 1 .* is not 'key_id:source:secret'"),
    (f"a:src:{SECRET},a:src:{SECRET}", "key id 'a' is listed twice"),
    ("a:src:short", "the secret has 5 characters; use at least 32"),
])
def test_producer_keys_that_cannot_work_are_refused_naming_the_entry(text, match):
    with pytest.raises(ConfigError, match=match):
        ProducerKeyring.parse(text)


def test_keys_for_the_embedded_stack_are_generated_once_private_to_their_owner(tmp_path):
    settings = Settings(home=tmp_path)
    with pytest.raises(ConfigError, match="PREFSTREAM_ANNOUNCE_PUBLIC_KEY"):
        announce_verifiers(settings)
    directory = ensure_local_keys(settings)
    files = {p.name: p.read_text() for p in directory.iterdir()}
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
    ensure_local_keys(settings)  # again: nothing replaced
    assert {p.name: p.read_text() for p in directory.iterdir()} == files
    signer = announce_signer(settings)
    assert set(announce_verifiers(settings)) == {signer.key_id}
    keyring = ProducerKeyring.parse(producer_keys_text(settings, WorkerSettings(producer_keys=None)))
    assert keyring.keys[GENERATOR_KEY_ID].source == GENERATOR_SOURCE
    assert keyring.keys[GENERATOR_KEY_ID].key == generator_signer(settings)
    # A setting wins over the home's file.
    assert producer_keys_text(settings, WorkerSettings(producer_keys="")) == ""


def test_an_announcer_without_a_signing_key_stops_before_anything_is_announced(tmp_path):
    from streams.kafka.announce import Announcer

    with pytest.raises(ConfigError, match="PREFSTREAM_ANNOUNCE_SIGNING_KEY.*prefstream keys announce"):
        Announcer(Settings(home=tmp_path))


# ---------------------------------------------------------------------------------------------- vouching
def _signed(value: bytes, key: signing.HmacKey) -> list:
    return sign_pair(pair_from_json(value), key)


def test_a_vouch_counts_only_when_a_key_of_the_pairs_own_source_signed_the_pair():
    gen = signing.hmac_key(SECRET, "t", key_id="gen")
    other = signing.hmac_key(OTHER_SECRET, "t", key_id="other")
    pipeline = fake_pipeline(producer_keys=f"gen:prefstream-generate:{SECRET},other:app-b:{OTHER_SECRET}")
    spoofed, legit = vouching_pair("spoofed", "prefstream-generate"), vouching_pair("legit", "prefstream-generate")
    mismatch, tampered = vouching_pair("mismatch", "prefstream-generate"), vouching_pair("tampered", "prefstream-generate")
    unknown = vouching_pair("unknown", "prefstream-generate")
    stranger = signing.hmac_key(OTHER_SECRET, "t", key_id="nobody")
    msgs = [FakeMessage(spoofed, offset=1),
            FakeMessage(legit, headers=_signed(legit, gen), offset=2),
            FakeMessage(mismatch, headers=_signed(mismatch, other), offset=3),  # a real key, of another source
            FakeMessage(tampered.replace(b"Mars has 2", b"Mars has 3"), headers=_signed(tampered, gen), offset=4),
            FakeMessage(unknown, headers=_signed(unknown, stranger), offset=5)]
    before = {r: counter("prefstream_vouches_stripped_total", reason=r)
              for r in ("unsigned", "source_mismatch", "bad_signature", "unknown_key")}
    accepted = counter("prefstream_vouches_accepted_total", source="prefstream-generate")
    out = decoded_outputs(pipeline.process(msgs))
    routes = {s["pair"]["pair_id"]: s["route"] for s in out["prefs.scored"]}
    assert routes.pop("legit") == "verified_by_tool"
    assert set(routes.values()) <= {"review", "silver", "flipped", "dropped"}, routes  # no verifier decided
    for s in out["prefs.scored"]:  # the stripped vouch is gone from what the pipeline passes on
        assert ("answer" in s["pair"]["metadata"]) == (s["pair"]["pair_id"] == "legit")
    assert [c["pair"]["pair_id"] for c in out.get("prefs.curated", []) if c["split"] == "verified_by_tool"] == ["legit"]
    for reason in before:
        assert counter("prefstream_vouches_stripped_total", reason=reason) == before[reason] + 1, reason
    assert counter("prefstream_vouches_accepted_total", source="prefstream-generate") == accepted + 1


def test_verified_by_tool_pairs_are_audited_shown_with_the_tools_winner_as_chosen():
    from streams.review import audit

    # The prompt's arithmetic says 42: the tool flips the producer's label, and the audit shows 42 first.
    value = json.dumps({"pair_id": "tool-1", "prompt": "What is 6 * 7?", "chosen": "43", "rejected": "42",
                        "objectivity": "factual", "task_category": "arithmetic"}).encode()
    out = decoded_outputs(fake_pipeline(producer_keys="", audit_share=1.0).process([FakeMessage(value)]))
    assert out["prefs.curated"][0]["split"] == "verified_by_tool"
    (task,) = [t for t in out["prefs.review"] if audit.kind_of(t) == "verified_by_tool"]
    assert (task["pair"]["chosen"], task["pair"]["rejected"]) == ("42", "43")
    assert audit.outcome("verified_by_tool", "chosen") == "right"
    assert audit.outcome("verified_by_tool", "rejected") == "wrong"


def test_without_producer_keys_no_source_may_vouch_and_code_tests_never_run():
    value = json.dumps({"pair_id": "c-1", "prompt": "add", "chosen": "def add(a, b):\n    return a - b",
                        "rejected": "def add(a, b):\n    return a + b", "source": "prefstream-generate",
                        "metadata": {"tests": "assert add(2, 3) == 5", "other": "kept"}}).encode()
    out = decoded_outputs(fake_pipeline(producer_keys="").process([FakeMessage(value)]))
    assert out["prefs.scored"][0]["route"] != "verified_by_tool"
    assert out["prefs.scored"][0]["pair"]["metadata"] == {"other": "kept"}


# ---------------------------------------------------------------------------------------------- on the stack
def _produce_raw(settings, records: list[tuple[bytes, list]]) -> None:
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config

    prod = Producer(producer_config(settings))
    for value, headers in records:
        prod.produce(settings.topic(topics.RAW), value=value, headers=headers or None)
    assert prod.flush(10) == 0


@pytest.mark.integration
def test_a_producer_claiming_the_generators_source_cannot_put_its_label_into_the_shards(settings):
    """The attack on a real worker: "Mars has 7 moons." with metadata.answer and the demo
    generator's source. Unsigned, it is not verified_by_tool and never reaches a shard as one; the same
    pair from the generator (signed with its key, the demo's path) is."""
    from streams.sdk import PreferenceProducer
    from trainers.storage.shards import iter_records

    spoofed = vouching_pair("mars-spoofed", "prefstream-generate")
    _produce_raw(settings, [(spoofed, [])])
    with PreferenceProducer(settings, key=generator_signer(settings)) as producer:
        producer.send(json.loads(vouching_pair("mars-signed", "prefstream-generate")))
    worker = WorkerProcess(settings).start()
    try:
        scored = {r["pair"]["pair_id"]: r for r in wait_for_scored(settings, {"mars-spoofed", "mars-signed"})}
        assert scored["mars-signed"]["route"] == "verified_by_tool"
        assert scored["mars-spoofed"]["route"] != "verified_by_tool"
        assert "answer" not in scored["mars-spoofed"]["pair"]["metadata"]
        deadline = time.monotonic() + 60
        while not (rows := [rec for _, rec in iter_records(settings.shards_dir)
                            if rec["pair"]["pair_id"] == "mars-signed"]):
            assert time.monotonic() < deadline, "the generator's verified pair never reached a shard"
            time.sleep(1)
        assert rows[0]["split"] == "verified_by_tool"
        spoofed_rows = [rec for _, rec in iter_records(settings.shards_dir) if rec["pair"]["pair_id"] == "mars-spoofed"]
        assert all(r["split"] != "verified_by_tool" for r in spoofed_rows), spoofed_rows
        text = worker.metrics()  # at least once: a batch redone after a failed commit counts again
        assert sample(text, 'prefstream_vouches_stripped_total{reason="unsigned"}') >= 1
        assert sample(text, 'prefstream_vouches_accepted_total{source="prefstream-generate"}') >= 1
    finally:
        assert worker.stop() == 0


# ---------------------------------------------------------------------------------------------- announcements
class _Model:
    """What a slot loads: the watcher and gate under test never look inside it."""

    def score_pairs(self, pairs):
        return [0.0] * len(pairs), [0.0] * len(pairs)


def _versions(settings, n: int, role: str = "current") -> list[str]:
    from trainers.storage.registry import ModelStore

    src = settings.models_dir.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        (src / "config.json").write_text(json.dumps({"i": i}))
        out.append(ModelStore(settings.models_dir).publish(src, role, promote=False).version)
        time.sleep(0.01)  # manifests' created_at strictly increasing
    return out


@pytest.mark.integration
def test_announcements_are_served_only_signed_newer_and_in_their_manifests_role(settings):
    """On the embedded broker, the worker's watcher: an old announcement re-published, the same record
    claiming the gold role, an unsigned or foreign-signed record, and a signed downgrade are each refused
    (the serving version stays, /metrics counts why); a signed rollback is served."""
    from confluent_kafka import Producer

    from streams.kafka.announce import Announcer
    from streams.kafka.config import producer_config
    from streams.runtime.health import serve
    from streams.runtime.processors.scorer import ModelSlot
    from streams.runtime.worker import VersionWatcher
    from trainers.storage.registry import ModelStore

    store, announce = ModelStore(settings.models_dir), Announcer(settings)
    v1, v2 = _versions(settings, 2)
    store.promote(v1, "current", announce=announce)
    slots = {role: ModelSlot(role, lambda rec: _Model()) for role in ("current", "gold")}
    watcher = VersionWatcher(settings, slots)
    watcher.drain()
    slots["current"].swap_if_ready()
    assert slots["current"].serving.version == v1
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    server = serve("127.0.0.1", 0, alive=lambda: True, ready=lambda: True)

    def serving(role: str = "current") -> str | None:
        slots[role].swap_if_ready()
        return slots[role].serving.version if slots[role].serving else None

    def refused(reason: str, role: str = "current") -> float:
        return counter("prefstream_model_announcements_refused_total", role=role, reason=reason)

    def expect_refused(reason: str, send, role: str = "current") -> None:
        before = refused(reason, role)
        send()
        deadline = time.monotonic() + 20
        while refused(reason, role) < before + 1:
            assert time.monotonic() < deadline, f"no {reason} refusal counted"
            time.sleep(0.1)
        assert serving() == v2 and serving("gold") is None

    try:
        store.promote(v2, "current", announce=announce)
        deadline = time.monotonic() + 20
        while serving() != v2:
            assert time.monotonic() < deadline, "the signed newer version was not served"
            time.sleep(0.1)
        old = next(m for m in raw_announcements(settings) if v1.encode() in m.value())  # v1's own announcement
        codec, prod = ValueCodec(), Producer(producer_config(settings))
        topic = settings.topic(topics.MODEL_VERSIONS)

        def send(record: dict | None = None, headers: list | None = None, value: bytes | None = None) -> None:
            if record is not None:
                value, plain = codec.encode("ModelVersion", record, topic)
                headers = plain + (headers or [])
            prod.produce(topic, key=b"current", value=value, headers=headers)
            assert prod.flush(10) == 0

        # The old announcement, byte for byte and validly signed, re-published: stale.
        expect_refused("stale", lambda: send(value=old.value(), headers=old.headers()))
        # The same record claiming the gold role: its signature no longer matches.
        old_record = codec.decode("ModelVersion", old.value(), old.headers(), topic)
        expect_refused("bad_signature", lambda: send(old_record | {"role": "gold", "announced_at": int(time.time() * 1000)},
                                                     [h for h in old.headers() if h[0] != "prefstream-schema"]), "gold")
        # Unsigned, and signed with a key the workers do not hold.
        fresh = store.version_record(v1, "current", "promote", "attack")
        expect_refused("unsigned", lambda: send(fresh))
        foreign = signing.ed25519_signer(signing.new_ed25519()[0], "attacker")
        expect_refused("unknown_key", lambda: Announcer(settings, signer=foreign)(fresh))
        # Signed with the real key (an operator's mistake): a current version as gold, and a downgrade.
        expect_refused("role_mismatch", lambda: announce(store.version_record(v2, "gold", "promote", "x")), "gold")
        expect_refused("downgrade", lambda: announce(store.version_record(v1, "current", "promote", "x")))
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for reason in ("stale", "unsigned", "unknown_key", "downgrade"):
            assert f'prefstream_model_announcements_refused_total{{reason="{reason}",role="current"}}' in text
        # A signed rollback is the one way back to an older version.
        store.rollback("current", announce=announce)
        deadline = time.monotonic() + 20
        while serving() != v1:
            assert time.monotonic() < deadline, "the signed rollback was not served"
            time.sleep(0.1)
    finally:
        watcher.stop.set()
        thread.join(10)
        server.shutdown()


def test_a_store_never_promotes_a_version_to_a_role_it_was_not_published_for(settings):
    from trainers.exceptions import RegistryError
    from trainers.storage.registry import ModelStore

    (v1,) = _versions(settings, 1)
    with pytest.raises(RegistryError, match="published for role 'current', not 'gold'"):
        ModelStore(settings.models_dir).promote(v1, "gold")


# ---------------------------------------------------------------------------------------------- annotations
def test_the_expert_flag_is_the_annotators_role_never_the_tasks_alone():
    from streams.review.app import VerdictIn, annotation

    t = review_task(1, expert=True)
    assert annotation(t, "erin", VerdictIn(verdict="A"), "chosen_first", expert=True)["expert"] is True
    assert annotation(t, "alice", VerdictIn(verdict="A"), "chosen_first")["expert"] is False
    assert annotation(review_task(2), "erin", VerdictIn(verdict="A"), "chosen_first", expert=True)["expert"] is False


@pytest.mark.integration
def test_annotations_the_review_app_writes_carry_its_signature(settings):
    from streams.kafka.reader import TopicReader

    keys = AnnotationKeys(review_keys(settings, ReviewSettings()))
    with make_client(settings) as client:
        client.queue.add(review_task(7, expert=True))
        assert client.get("/api/tasks/next?expert=true", headers=auth("erin")).status_code == 200
        assert client.post("/api/tasks/pair-7/verdict", json={"verdict": "A"}, headers=auth("erin")).status_code == 200
    with TopicReader(settings.topic(topics.ANNOTATIONS), "Annotation", settings) as reader:
        msg = next(iter(reader.messages(idle_timeout=5)))
        ann = reader.decode(msg).value
    assert ann["expert"] is True and keys.check(ann, msg.headers()) is None


@pytest.mark.integration
def test_a_forged_expert_annotation_goes_to_the_dlq_and_decides_nothing(settings):
    """The attack: an Annotation with "expert": true written straight to prefs.annotations. It
    and its variants (a foreign key, a signed verdict altered) are dead-lettered with the reason; three
    verdicts the app signed still decide their task."""
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config
    from streams.review.app import VerdictIn, annotation
    from streams.review.queue import ReviewQueue

    r = redis.Redis.from_url(settings.redis_url)
    q = ReviewQueue(r, settings.topic_prefix)
    r.set(q.k("initialized"), "1")
    target, honest = review_task(90, expert=True), review_task(91)
    q.add(target)
    q.add(honest)
    codec, topic = ValueCodec(), settings.topic(topics.ANNOTATIONS)
    app_keys = AnnotationKeys(review_keys(settings, ReviewSettings()))
    forged = annotation(target, "mallory", VerdictIn(verdict="B"), "chosen_first") | {"expert": True}
    prod = Producer(producer_config(settings))
    value, headers = codec.encode("Annotation", forged, topic)
    prod.produce(topic, key=b"unsigned", value=value, headers=headers)
    foreign = AnnotationKeys([signing.hmac_key(OTHER_SECRET, "attacker")])
    prod.produce(topic, key=b"foreign", value=value, headers=foreign.headers(codec, value, headers, topic))
    # A verdict the app signed, altered to claim expert authority: the signature no longer matches.
    honest_ann = annotation(target, "alice", VerdictIn(verdict="B"), "chosen_first")
    plain, plain_headers = codec.encode("Annotation", honest_ann, topic)
    altered, _ = codec.encode("Annotation", honest_ann | {"expert": True}, topic)
    prod.produce(topic, key=b"altered", value=altered,
                 headers=app_keys.headers(codec, plain, plain_headers, topic))
    assert prod.flush(10) == 0
    publish(settings, "Annotation", topics.ANNOTATIONS,
            [(honest["task_id"], annotation(honest, who, VerdictIn(verdict="A"), "chosen_first")) for who in "xyz"])
    before = {r_: counter("prefstream_annotations_refused_total", reason=r_)
              for r_ in ("unsigned", "unknown_key", "bad_signature")}
    dead = aggregate_until_dead_letters(settings, r, 3)
    reasons = {d["original_key"]: d["reason"] for d in dead}
    assert reasons == {b"unsigned": "annotation_unsigned", b"foreign": "annotation_unknown_key",
                       b"altered": "annotation_bad_signature"}
    assert all("review app" in d["detail"] for d in dead)
    verified = read_topic(settings, topics.VERIFIED, "VerifiedPair")
    assert [v["pair"]["pair_id"] for v in verified] == ["pair-91"]
    curated = read_topic(settings, topics.CURATED, "CuratedPair")
    assert "pair-90" not in {c["pair"]["pair_id"] for c in curated}, "a forged verdict made a gold label"
    for reason, n in before.items():
        assert counter("prefstream_annotations_refused_total", reason=reason) == n + 1, reason

