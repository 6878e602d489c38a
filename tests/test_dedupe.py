"""Content de-duplication (exact and near, whatever the pair_id) and decontamination against evaluation files:
the hashing, MinHash and contamination index alone, the pipeline's decisions on fake Redis, and one real worker."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from schemas.pairs import validate_pair
from streams.exceptions import ConfigError
from streams.kafka import topics
from streams.kafka.config import producer_config
from streams.runtime import metrics
from streams.runtime.curation import contamination, minhash
from streams.runtime.curation.dedupe import (
    DUPLICATE,
    NEAR_DUPLICATE,
    ContentDedupe,
    content_key,
    pair_signature,
)
from streams.settings import WorkerSettings
from tests.helpers import (
    FakeMessage,
    FakeRedis,
    WorkerProcess,
    decoded_outputs,
    fake_pipeline,
    metric,
    read_topic,
    wait_for_scored,
)

ESSAY = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion about "
         "maintenance costs, staffing and the new library wing, members agreed to postpone the vote until the "
         "auditors deliver their report, which is expected at the end of next month. In the meantime the "
         "treasurer will collect three quotes for the roof repairs, the chair will write to the council about the "
         "parking permits, and the secretary will circulate the minutes together with a summary of the open "
         "questions so that every member can comment before the next meeting in the main hall.")


def _pair(pid: str, prompt: str, chosen: str, rejected: str) -> dict:
    return validate_pair({"pair_id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected})


def _json(pid: str, prompt: str, chosen: str, rejected: str) -> bytes:
    return json.dumps({"pair_id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected}).encode()


# ------------------------------------------------------------------------------------------------ hashing

def test_content_key_ignores_pair_id_side_order_case_and_whitespace():
    a = _pair("a", "What is the capital of France?", "Paris.", "Lyon.")
    swapped = _pair("b", "What is the capital of France?", "Lyon.", "Paris.")
    spaced = _pair("c", "  what is the   capital of\nfrance? ", "PARIS.", "lyon.")
    other = _pair("d", "What is the capital of Italy?", "Paris.", "Lyon.")
    assert content_key(a)[0] == content_key(swapped)[0] == content_key(spaced)[0] != content_key(other)[0]
    assert content_key(a)[1] != content_key(swapped)[1], "the orientation flag tells a swapped copy apart"


def test_minhash_is_order_independent_and_separates_near_from_different():
    base = _pair("a", "Summarise the meeting notes.", ESSAY, "No.")
    near = _pair("b", "Summarise the meeting notes.", ESSAY.replace("Tuesday", "Wednesday"), "No.")
    different = _pair("c", "Summarise the meeting notes.", "The meeting decided nothing of note.", "No.")
    assert minhash.similarity(pair_signature(base), pair_signature(near)) >= 0.9
    assert minhash.similarity(pair_signature(base), pair_signature(different)) < 0.5
    assert (minhash.signature("x y z", ESSAY) == minhash.signature(ESSAY, "x y z")).all()
    # Templated short pairs that differ in one value stay apart: word shingles change wherever the value is.
    assert minhash.similarity(minhash.signature("Capital number 12? Answer 12."),
                              minhash.signature("Capital number 112? Answer 112.")) < 0.5
    assert minhash.from_text(minhash.to_text(pair_signature(base))) is not None
    assert minhash.from_text("not hex") is None


def test_content_dedupe_names_the_first_pair_and_lets_a_replay_through():
    dedupe = ContentDedupe(FakeRedis(), 3600, 0.9)
    first = _pair("first", "Summarise the meeting notes.", ESSAY, "No.")
    swapped = _pair("swapped", "Summarise the meeting notes.", "No.", ESSAY)
    near = _pair("near", "Summarise the meeting notes.", ESSAY.replace("Tuesday", "Wednesday"), "No.")
    other = _pair("other", "Summarise the meeting notes.", "Nothing was decided.", "No.")
    v = dedupe.check([first], ["raw:0:1"])
    assert v[0].reason is None and v[0].held
    v = dedupe.check([swapped, near, other, first], ["raw:0:2", "raw:0:3", "raw:0:4", "raw:0:1"])
    assert (v[0].reason, v[0].first) == (DUPLICATE, "first") and "swapped" in v[0].detail and "raw:0:1" in v[0].detail
    assert (v[1].reason, v[1].first) == (NEAR_DUPLICATE, "first") and "'first'" in v[1].detail
    assert v[2].reason is None, "a different pair below the threshold is kept"
    assert v[3].reason is None, "the first pair met again (a replay) is not a duplicate of itself"
    # Within one batch: the second copy repeats the first.
    v = dedupe.check([_pair("x1", "Q?", "A one.", "B"), _pair("x2", "q?", "b", "a one.")], ["raw:1:1", "raw:1:2"])
    assert v[0].reason is None and (v[1].reason, v[1].first) == (DUPLICATE, "x1")
    # Short pairs are checked for exact repeats only: these differ in a tag and are two pairs.
    v = dedupe.check([_pair("t1", "What is 9^9^9^9? (#3)", "1", "2"), _pair("t2", "What is 9^9^9^9? (#7)", "1", "2")],
                     ["raw:2:1", "raw:2:2"])
    assert [x.reason for x in v] == [None, None]
    assert ContentDedupe(FakeRedis(), 0, 0.9).check([first], ["raw:0:1"])[0].held == [], "retention 0: off"
    # The same pair_id from another offset is a resend (its pair_id claim may have expired first): a duplicate.
    v = dedupe.check([first], ["raw:0:9"])
    assert (v[0].reason, v[0].first) == (DUPLICATE, "first") and v[0].held == []


def test_a_kept_pair_holds_its_band_keys_so_giving_it_back_frees_them():
    redis = FakeRedis()
    dedupe = ContentDedupe(redis, 3600, 0.9)
    v = dedupe.check([_pair("first", "Summarise the meeting notes.", ESSAY, "No.")], ["raw:0:1"])
    bands = [k for k, _ in v[0].held if k.startswith(dedupe.lsh)]
    assert bands and all(redis.data[k] == b"first" for k in bands)
    from streams.runtime.processors.ingest import RELEASE_SCRIPT

    pipe = redis.pipeline()
    for key, value in v[0].held:
        pipe.eval(RELEASE_SCRIPT, 1, key, value)
    pipe.execute()
    assert not any(k in redis.data for k in bands)


# ------------------------------------------------------------------------------------------- pipeline (no broker)

def test_pipeline_dead_letters_repeats_and_keeps_replays_and_resends():
    pipeline = fake_pipeline()
    a = FakeMessage(_json("a", "Summarise the meeting notes.", ESSAY, "No."), offset=1)
    out = decoded_outputs(pipeline.process([a]))
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["a"]
    # The batch redone after a crash (same offsets): processed again, nothing dead-lettered.
    out = decoded_outputs(pipeline.process([a]))
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["a"] and "prefs.dlq" not in out
    swapped = FakeMessage(_json("b", "Summarise the meeting  notes.", "no.", ESSAY), offset=2)
    near = FakeMessage(_json("c", "Summarise the meeting notes.", ESSAY.replace("Tuesday", "Monday"), "No."), offset=3)
    resend = FakeMessage(_json("a", "Summarise the meeting notes.", ESSAY, "No."), offset=4)
    out = decoded_outputs(pipeline.process([swapped, near, resend]))
    dead = {d["original_value"]: d for d in out["prefs.dlq"]}
    assert dead[swapped.value()]["reason"] == "duplicate" and "'a'" in dead[swapped.value()]["detail"]
    assert dead[near.value()]["reason"] == "near_duplicate" and "'a'" in dead[near.value()]["detail"]
    assert len(dead) == 2 and "prefs.scored" not in out, "a resend under the same pair_id is dropped as before"
    # A repeat holds no claim: once the first pair is forgotten (retention), the same record is processed.
    pipeline.redis.data.clear()
    out = decoded_outputs(pipeline.process([swapped]))
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["b"]


def test_pipeline_gives_content_claims_back_when_a_later_stage_dead_letters():
    from tests.helpers import FakeScorer

    pipeline = fake_pipeline(FakeScorer(poison=ESSAY))
    out = decoded_outputs(pipeline.process([FakeMessage(_json("a", "Summarise.", ESSAY, "No."), offset=1)]))
    assert [d["reason"] for d in out["prefs.dlq"]] == ["processing_error"]
    pipeline.scorer = FakeScorer()
    out = decoded_outputs(pipeline.process([FakeMessage(_json("b", "Summarise.", ESSAY, "No."), offset=2)]))
    assert [s["pair"]["pair_id"] for s in out["prefs.scored"]] == ["b"], "a dead-lettered pair is nobody's first"


# ------------------------------------------------------------------------------------------------ decontamination

def _rewardbench(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": "good answer", "rejected": "bad answer",
                                        "subset": "alpacaeval-easy", "id": i}) + "\n" for i, p in enumerate(prompts)))
    return path


def _judgebench(path: Path, questions: list[str]) -> Path:
    path.write_text(json.dumps([{"question": q, "response_A": "A", "response_B": "B", "label": "A>B",
                                 "source": "mmlu-pro-math"} for q in questions]))
    return path


def test_contamination_index_matches_case_whitespace_and_light_edits(tmp_path):
    rb = _rewardbench(tmp_path / "rewardbench.jsonl", [ESSAY, "How do I kill a Python process?"])
    jb = _judgebench(tmp_path / "judgebench.json", ["Compute the sum of the first 100 positive integers."])
    index = contamination.load(f"{rb}, {jb}", 0.7)
    assert index.files == {"rewardbench": 2, "judgebench": 1}
    assert index.reason(_pair("x", "how do I KILL a   python process?", "a", "b")) == "contaminated:rewardbench"
    assert index.match(_pair("x", ESSAY.replace("Tuesday", "Thursday"), "a", "b")) == "rewardbench"
    assert index.match(_pair("x", "Compute the sum of the first 100 positive integers.", "a", "b")) == "judgebench"
    assert index.match(_pair("x", "How do I kill a Java process?", "a", "b")) is None
    assert index.match(_pair("x", "Compute the sum of the first 200 positive integers.", "a", "b")) is None
    assert contamination.load(None, 0.7).match(_pair("x", ESSAY, "a", "b")) is None


def test_a_missing_or_unreadable_decontamination_file_stops_the_start_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"'/nope/rb.jsonl', which is not a file.*take it out of the list"):
        contamination.load("/nope/rb.jsonl", 0.7)
    bad = tmp_path / "broken.jsonl"
    bad.write_text("[not json\n")
    with pytest.raises(ConfigError, match="broken.jsonl"):
        contamination.load(str(bad), 0.7)
    with pytest.raises(ConfigError, match="broken.jsonl"):
        fake_pipeline(PREFSTREAM_DECONTAMINATE=str(bad))


def test_pipeline_scores_a_contaminated_pair_and_sends_it_nowhere(tmp_path):
    rb = _rewardbench(tmp_path / "rb-test.jsonl", ["Name three primary colours."])
    pipeline = fake_pipeline(PREFSTREAM_DECONTAMINATE=str(rb))
    before = metrics.CONTAMINATED.labels("rb-test")._value.get()
    # Long chosen, short rejected: the fake scorer is confident, so a clean pair would be curated or reviewed.
    msgs = [FakeMessage(_json("leak", "name three PRIMARY colours.", "Red, yellow and blue." * 5, "No."), offset=1),
            FakeMessage(_json("clean", "Name three fruits.", "Apple, pear and plum." * 5, "No."), offset=2)]
    out = decoded_outputs(pipeline.process(msgs))
    scored = {s["pair"]["pair_id"]: s for s in out["prefs.scored"]}
    assert (scored["leak"]["route"], scored["leak"]["route_reason"]) == ("dropped", "contaminated:rb-test")
    assert scored["clean"]["route_reason"] != "contaminated:rb-test"
    for name in ("prefs.curated", "prefs.review", "prefs.deferred"):
        assert all(r.get("pair", {}).get("pair_id") != "leak" for r in out.get(name, [])), name
    assert metrics.CONTAMINATED.labels("rb-test")._value.get() == before + 1
    assert pipeline.index.size == 1, "a contaminated pair is no retrieval neighbour (it would be re-labelled)"


def test_settings_read_the_decontaminate_list_by_its_documented_name(monkeypatch):
    monkeypatch.setenv("PREFSTREAM_DECONTAMINATE", "a.jsonl,b.json")
    assert WorkerSettings().decontaminate == "a.jsonl,b.json"


# ------------------------------------------------------------------------------------------------ a real worker

@pytest.mark.integration
def test_worker_dead_letters_repeats_and_keeps_contaminated_pairs_out_of_training(settings, tmp_path):
    tag = uuid.uuid4().hex[:8]
    leaked = f"Explain in two sentences why the sky is blue ({tag})."
    bench = _rewardbench(tmp_path / "rewardbench-test.jsonl", [leaked])
    essay = f"{ESSAY} Reference {tag}."
    pairs = {
        "first": _pair(f"first-{tag}", "Summarise the meeting notes.", essay, "No."),
        "swapped": _pair(f"swapped-{tag}", "Summarise the meeting notes.", "No.", essay),
        "near": _pair(f"near-{tag}", "Summarise the meeting notes.", essay.replace("Tuesday", "Friday"), "No."),
        "leak": _pair(f"leak-{tag}", "  " + leaked.upper() + " ", "Rayleigh scattering favours short wavelengths. "
                      "So blue light is scattered most.", "Because the sea is blue."),
        "clean": _pair(f"clean-{tag}", "Name three fruits.", "Apple, pear and plum.", "Rocks."),
    }
    worker = WorkerProcess(settings, extra_env={"PREFSTREAM_DECONTAMINATE": str(bench)}).start()
    try:
        producer = Producer(producer_config(settings))
        for name in ("first", "swapped", "near", "leak", "clean"):  # one key, one partition: first comes first
            producer.produce(settings.topic(topics.RAW), value=json.dumps(pairs[name]).encode(), key=tag.encode())
        assert producer.flush(30) == 0
        scored = {r["pair"]["pair_id"]: r for r in
                  wait_for_scored(settings, {pairs[n]["pair_id"] for n in ("first", "leak", "clean")}, timeout=120)}
        deadline, dead = time.monotonic() + 60, []
        while len(dead) < 2 and time.monotonic() < deadline:
            dead = read_topic(settings, topics.DLQ, "DeadLetter", idle=1.0)
        by_id = {json.loads(d["original_value"])["pair_id"]: d for d in dead}
        first = pairs["first"]["pair_id"]
        assert by_id[pairs["swapped"]["pair_id"]]["reason"] == "duplicate" and first in by_id[pairs["swapped"]["pair_id"]]["detail"]
        assert by_id[pairs["near"]["pair_id"]]["reason"] == "near_duplicate" and first in by_id[pairs["near"]["pair_id"]]["detail"]
        leak = pairs["leak"]["pair_id"]
        assert scored[leak]["route"] == "dropped" and scored[leak]["route_reason"] == "contaminated:rewardbench-test"
        time.sleep(1.5)  # past the shard writer's 1 s max age: anything curated would be in a shard by now
        for name, schema in ((topics.CURATED, "CuratedPair"), (topics.REVIEW, "ReviewTask")):
            assert leak not in {r["pair"]["pair_id"] for r in read_topic(settings, name, schema, idle=1.0)}, name
        shards = [f for f in Path(settings.shards_dir).rglob("*") if f.is_file()]
        assert all(leak.encode() not in f.read_bytes() for f in shards), "a contaminated pair reached a shard"
        text = worker.metrics()
        assert metric(text, "prefstream_contaminated_total", file="rewardbench-test") == 1
        assert metric(text, "prefstream_dlq_total", reason="duplicate") == 1
        assert metric(text, "prefstream_dlq_total", reason="near_duplicate") == 1
    finally:
        assert worker.stop() == 0


def test_the_demo_report_counts_what_was_kept_out():
    from streams.local.report import kept_out

    scored = {"a": {"route_reason": "contaminated:rewardbench"}, "b": {"route_reason": "uncertain"},
              "c": {"route_reason": None}}
    dlq = [({"reason": "duplicate"}, 0), ({"reason": "near_duplicate"}, 0), ({"reason": "duplicate"}, 0),
           ({"reason": "invalid_json"}, 0)]
    assert kept_out(scored, dlq) == {"duplicate": 2, "near_duplicate": 1, "contaminated": 1}
