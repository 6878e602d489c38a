"""Producing and consuming through the real embedded broker: CLI round trip, SDK, kcat interop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from schemas.pairs import validate_pair
from schemas.wire import ValueCodec
from streams.exceptions import DeliveryError
from streams.kafka import topics
from streams.sdk import PreferenceProducer, ScoreConsumer, TopicReader
from streams.settings import Settings
from tests.helpers import hh_valid_pairs, json_lines, require_hh_rlhf, run_cli

pytestmark = pytest.mark.integration

ROUND_TRIP_PAIRS = 1000


def test_hh_rlhf_round_trip_is_byte_identical(settings, tmp_path):
    path = require_hh_rlhf()
    produced = run_cli(["produce", str(path), "--limit", str(ROUND_TRIP_PAIRS)], settings)
    assert f"sent {ROUND_TRIP_PAIRS}" in produced.stderr
    consumed = run_cli(["consume", topics.RAW, "--max", str(ROUND_TRIP_PAIRS), "--timeout", "10"], settings)
    records = json_lines(consumed.stdout)
    assert len(records) == ROUND_TRIP_PAIRS
    # Expected content: the same source lines, parsed the documented way; rejected lines skipped.
    expected = hh_valid_pairs(ROUND_TRIP_PAIRS)
    by_id = {r["pair_id"]: r for r in records}
    assert len(by_id) == ROUND_TRIP_PAIRS
    for exp in expected:
        got = by_id[exp["pair_id"]]
        for key in ("conversation", "chosen", "rejected"):
            assert json.dumps(got[key], ensure_ascii=False).encode() == json.dumps(exp[key], ensure_ascii=False).encode()


def test_produce_reports_rejected_lines_with_reasons(settings, tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join([
        json.dumps({"prompt": "q1", "chosen": "a", "rejected": "b"}),
        "{broken json",
        json.dumps({"prompt": "q2", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "q3", "chosen": "a"}),
        json.dumps({"prompt": "q4", "chosen": "c", "rejected": "d"}),
    ]) + "\n")
    out = run_cli(["produce", str(src), "--format", "json"], settings)
    assert "sent 2" in out.stderr and "rejected 3" in out.stderr
    for reason in ("identical_responses", "missing_field", "bad_format"):
        assert reason in out.stderr


def test_judgebench_format_orients_by_label(settings, tmp_path):
    src = tmp_path / "jb.jsonl"
    src.write_text(json.dumps({"question": "q", "response_A": "A text", "response_B": "B text", "label": "B>A"}) + "\n")
    run_cli(["produce", str(src)], settings)
    rec = json_lines(run_cli(["consume", topics.RAW, "--max", "1"], settings).stdout)[0]
    assert (rec["chosen"], rec["rejected"], rec["source"]) == ("B text", "A text", "judgebench")


def test_sdk_delivery_errors_are_raised_not_dropped(settings):
    broken = settings.model_copy(update={"bootstrap": "127.0.0.1:1"})
    producer = PreferenceProducer(broken)
    producer._producer = type(producer._producer)(
        {"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 500, "enable.idempotence": True})
    producer.send({"prompt": "q", "chosen": "a", "rejected": "b"})
    with pytest.raises(DeliveryError, match="not written|unacknowledged"):
        producer.flush(timeout=3)


def test_score_consumer_commits_after_processing(settings):
    codec = ValueCodec()
    topic = settings.topic(topics.SCORED)
    from confluent_kafka import Producer

    from streams.kafka.config import producer_config
    prod = Producer(producer_config(settings))
    for i in range(5):
        pair = validate_pair({"prompt": f"q{i}", "chosen": "a", "rejected": "b"})
        rec = {"pair": pair, "reward_chosen": 1.0, "reward_rejected": 0.0, "p": 0.73, "model_version": "bootstrap",
               "gold_reward_chosen": None, "gold_reward_rejected": None, "gold_p": None, "gold_model_version": None,
               "scored_at": 0}
        value, headers = codec.encode("ScoredPair", rec, topic)
        prod.produce(topic, value=value, key=pair["pair_id"].encode(), headers=headers)
    prod.flush(10)
    seen = []
    consumer = ScoreConsumer(settings, group="g-test")
    for rec in consumer:
        seen.append(rec["pair"]["pair_id"])
        if len(seen) == 3:
            break
    consumer.close()  # commits the third record: it was processed
    rest = ScoreConsumer(settings, group="g-test")
    remaining = [r["pair"]["pair_id"] for r in rest.records(idle_timeout=5)]
    rest.close()
    assert len(remaining) == 2 and not set(remaining) & set(seen)


@pytest.fixture(scope="module")
def kcat(tmp_path_factory) -> dict:
    """Debian's kcat binary, run against the librdkafka that confluent-kafka ships.

    Debian bookworm's kcat links librdkafka 2.0.2, which cannot parse Tansu's ApiVersion v3
    response ("Read underflow"); the kcat code is unchanged, only the library is newer.
    """
    path = shutil.which("kcat")
    if path is None:
        pytest.skip("kcat is not installed (apt-get install kcat; .ci/run installs it)")
    import confluent_kafka

    libs = sorted((Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs").glob("librdkafka*.so*"))
    env = dict(os.environ)
    if libs:
        libdir = tmp_path_factory.mktemp("rdkafka")
        (libdir / "librdkafka.so.1").symlink_to(libs[0])
        env["LD_LIBRARY_PATH"] = str(libdir)
    return {"bin": path, "env": env}


def test_kcat_json_pair_is_accepted_by_our_codec(settings, kcat):
    topic = settings.topic(topics.RAW)
    pair = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "label_source": "human"}
    subprocess.run([kcat["bin"], "-P", "-b", settings.bootstrap, "-t", topic, "-k", "k1"],
                   input=json.dumps(pair).encode(), check=True, timeout=30, env=kcat["env"])
    with TopicReader(topic, "PreferencePair", settings) as reader:
        records = list(reader.records(idle_timeout=3))
    assert len(records) == 1
    assert records[0]["chosen"] == "Paris." and records[0]["conversation"][0]["content"] == "Capital of France?"


def test_record_we_produce_is_readable_with_kcat(settings, kcat):
    pair = {"prompt": "ping?", "chosen": "pong", "rejected": "no", "pair_id": "kcat-interop-1"}
    with PreferenceProducer(settings) as producer:
        producer.send(pair)
    out = subprocess.run([kcat["bin"], "-C", "-b", settings.bootstrap, "-t", settings.topic(topics.RAW), "-e", "-q",
                          "-f", "%k\t%h\n"], capture_output=True, check=True, timeout=30, env=kcat["env"])
    key, headers = out.stdout.decode().strip().split("\t")
    assert key == "kcat-interop-1"
    assert "prefstream-schema=" in headers
    raw = subprocess.run([kcat["bin"], "-C", "-b", settings.bootstrap, "-t", settings.topic(topics.RAW), "-e", "-q",
                          "-f", "%s"], capture_output=True, check=True, timeout=30, env=kcat["env"]).stdout
    fp = headers.split("prefstream-schema=")[1].split(",")[0]
    assert ValueCodec().decode("PreferencePair", raw, [("prefstream-schema", fp.encode())])["chosen"] == "pong"


def test_sdk_unused_settings_defaults_are_local():
    s = Settings()
    assert s.bootstrap.startswith("127.0.0.1") and s.topic("prefs.raw") == "prefs.raw"
