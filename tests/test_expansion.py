"""Error-driven expansion: a human verdict that corrects the model sends its near neighbours back to review.

The decision alone (curation/expansion.py, review/neighbour_tasks.py), then the processor against the real
broker and Redis of the test session: pairs routed by a pipeline (their vectors fixed, so the similarities are
known) are stored in Redis, a VerifiedPair that corrects the model is produced on prefs.verified, and the
expansion's step writes a ``neighbour_of_error`` task for the wrong-labelled neighbour and none for the right one,
once, however often the verdict is read.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
from confluent_kafka import Producer

from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.config import producer_config
from streams.review import neighbour_tasks
from streams.runtime.curation import expansion
from streams.runtime.expansion import Expansion
from streams.runtime.pipeline import Pipeline
from streams.runtime.retrieval.store import IndexStore
from streams.settings import WorkerSettings
from tests.helpers import FakeEmbedder, FakeMessage, FakeScorer, read_topic

TAU = 0.8


def test_a_verdict_corrects_the_model_only_against_its_p():
    assert expansion.is_correction(0.7, "rejected") and expansion.is_correction(0.3, "chosen")
    assert not expansion.is_correction(0.7, "chosen") and not expansion.is_correction(0.3, "rejected")


def test_a_near_neighbour_of_a_confident_error_goes_to_review_and_a_far_one_does_not():
    error = expansion.error_vote([expansion.Evidence(1.0, 0.9)])
    near = expansion.look_again("silver", 0.9, 0.9, error, TAU, "c")
    assert near is not None and near.kind == "review" and near.reason.startswith("neighbour_of_error: silver now uncertain")
    assert expansion.look_again("silver", 0.9, 0.2, error, TAU, "c") is None
    # A flipped pair's label is its rejected side: a model sure of the chosen side says the flip is wrong.
    assert expansion.look_again("flipped", 0.7, 0.1, error, TAU, "c").reason.startswith(
        "neighbour_of_error: flipped now looks wrong")
    assert expansion.look_again("flipped", 0.03, 0.9, 0.1, TAU, "c") is None
    for route in ("review", "verified_by_tool", "dropped"):  # humans, a checker, or never trained on
        assert expansion.look_again(route, 0.55, 1.0, 1.0, TAU, "c") is None


def test_verified_pairs_the_model_got_right_weigh_against_a_lone_error():
    lone = expansion.error_vote([expansion.Evidence(1.0, 0.9), expansion.Evidence(0.9, 0.05),
                                 expansion.Evidence(0.9, 0.1)])
    region = expansion.error_vote([expansion.Evidence(1.0, 0.9), expansion.Evidence(0.9, 0.8)])
    assert lone < 0.4 < 0.8 < region
    assert expansion.look_again("silver", 0.97, 0.9, lone, TAU, "c") is None
    assert expansion.look_again("silver", 0.97, 0.9, region, TAU, "c") is not None
    assert expansion.error_vote([]) == 0.0


def test_the_aggregator_reads_what_a_neighbour_task_caught():
    reason = neighbour_tasks.reason("flipped", "now uncertain (guided p=0.6)")
    assert neighbour_tasks.reviewed_route(reason) == "flipped"
    assert neighbour_tasks.caught(reason, "chosen") is True  # the flip was wrong
    assert neighbour_tasks.caught(reason, "rejected") is False
    assert neighbour_tasks.caught(neighbour_tasks.reason("silver", "x"), "rejected") is True
    assert neighbour_tasks.caught(reason, "tie") is None and neighbour_tasks.caught("mispredicted", "chosen") is None


def test_training_reads_a_pair_the_humans_decided_later_once_as_gold():
    from trainers.training.selection import superseded_by_gold

    silver = {"pair_id": "n1", "extra": {"split": "silver"}}
    gold = {"pair_id": "n1", "extra": {"split": "gold"}}
    other = {"pair_id": "n2", "extra": {"split": "flipped"}}
    assert superseded_by_gold([silver, gold, other], {"n1"}) == [gold, other]


@pytest.mark.integration
def test_the_aggregator_counts_what_a_neighbour_task_caught(settings):
    from streams.review import metrics as review_metrics
    from streams.review.aggregator import Aggregator
    from tests.helpers import annotation, review_task

    r = redis.Redis.from_url(settings.redis_url)
    agg = Aggregator(r, settings.topic_prefix)
    caught = review_metrics.EXPANSION_CAUGHT.labels("silver")._value.get()
    kept = review_metrics.EXPANSION_CONFIRMED.labels("flipped")._value.get()
    wrong_silver = review_task(1) | {"reason": neighbour_tasks.reason("silver", "now uncertain (guided p=0.66)")}
    right_flip = review_task(2) | {"reason": neighbour_tasks.reason("flipped", "now uncertain (guided p=0.7)")}
    for t, side in ((wrong_silver, "rejected"), (right_flip, "rejected")):
        for who in ("a", "b", "c"):
            agg.handle(annotation(t, who, side), task=t)
    assert review_metrics.EXPANSION_CAUGHT.labels("silver")._value.get() == caught  # not before the commit
    agg.committed()
    assert review_metrics.EXPANSION_CAUGHT.labels("silver")._value.get() == caught + 1
    assert review_metrics.EXPANSION_CONFIRMED.labels("flipped")._value.get() == kept + 1


# ---------------------------------------------------------------------------------------------- integration
CORRECTED, WRONG, RIGHT = "corrected", "wrong-neighbour", "right-neighbour"
PROMPTS = {CORRECTED: "How do I bake sourdough bread at home?",
           WRONG: "What is the best way to bake sourdough bread?",
           RIGHT: "Explain how vaccines train the immune system."}
# The model's p for each pair's chosen side: the corrected pair went to review (uncertain), the neighbours were
# curated as silver on the model's and the gold model's word.
P = {CORRECTED: 0.7, WRONG: 0.9, RIGHT: 0.95}


class FixedEmbedder(FakeEmbedder):
    """The three prompts at known angles (the sourdough pair 0.89 apart, the vaccine one 0.1 from both), any
    other text (the labeler's taxonomy) at a hashed direction."""

    def embed(self, texts):
        out = super().embed(texts)
        base = {CORRECTED: [1.0, 0, 0], WRONG: [0.89, 0.456, 0], RIGHT: [0.1, 0, 0.995]}
        for i, t in enumerate(texts):
            for pid, prompt in PROMPTS.items():
                if t == prompt:
                    v = np.zeros(self.dim, dtype=np.float32)
                    v[:3] = base[pid]
                    out[i] = v / np.linalg.norm(v)
        return out


class PairScorer(FakeScorer):
    def versions(self):
        return "bootstrap", "gold-v1"

    def score(self, pairs):
        out = super().score(pairs)
        for pair, s in zip(pairs, out, strict=True):
            p = P[pair["pair_id"]]
            s.update(p=p, gold_p=p, gold_reward_chosen=0.0, gold_reward_rejected=float(np.log(1 / p - 1)),
                     gold_model_version="gold-v1")
        return out


def _produce_verified(settings, pair: dict, label: str) -> None:
    topic = settings.topic(topics.VERIFIED)
    value, headers = ValueCodec(settings.schema_registry_url).encode("VerifiedPair", {
        "pair": pair, "label": label, "agreement": 1.0, "annotators": ["a", "b", "c"], "decided_by": "unanimous",
        "strength": None, "rationale": None, "verified_at": int(time.time() * 1000)}, topic)
    producer = Producer(producer_config(settings))
    producer.produce(topic, key=pair["pair_id"].encode(), value=value, headers=headers)
    producer.flush(10)


def _step_until(exp: Expansion, timeout: float = 60) -> None:
    """Step until the expansion has handled a VerifiedPair (its consumer joins the group first)."""
    deadline = time.monotonic() + timeout
    while exp.step() == 0:
        assert time.monotonic() < deadline, "the expansion never read prefs.verified"
        time.sleep(0.2)
    exp.step()  # idle now: its markers-only transaction lets readers take the step's tasks


@pytest.mark.integration
def test_a_corrected_verdict_sends_the_wrong_neighbour_to_review_once(settings):
    r = redis.Redis.from_url(settings.redis_url)
    pipeline = Pipeline(settings, WorkerSettings(), r, PairScorer(), FixedEmbedder())
    raw = [FakeMessage(json.dumps({"pair_id": pid, "prompt": prompt, "chosen": f"A careful answer about {pid}.",
                                   "rejected": "No.", "metadata": {"flipped": "true" if pid == WRONG else "false"}}
                                  ).encode(), offset=i) for i, (pid, prompt) in enumerate(PROMPTS.items())]
    pipeline.process(raw)
    stored = pipeline.store.get(list(PROMPTS))
    assert {pid: s.route for pid, s in stored.items()} == {CORRECTED: "review", WRONG: "silver", RIGHT: "silver"}

    # The humans prefer the corrected pair's rejected side: the model's p for their side was 0.3.
    corrected = stored[CORRECTED].pair
    verified = corrected | {"chosen": corrected["rejected"], "rejected": corrected["chosen"], "label_source": "human"}
    exp = Expansion(settings, WorkerSettings(), pipeline, f"test-{settings.topic_prefix}")
    try:
        _produce_verified(settings, verified, "flipped")
        _step_until(exp)
        tasks = [t for t in read_topic(settings, topics.REVIEW, "ReviewTask", idle=2)
                 if t["reason"].startswith(neighbour_tasks.REASON)]
        assert [t["pair"]["pair_id"] for t in tasks] == [WRONG]
        [task] = tasks
        assert task["task_id"] == pipeline.task_ids.of(WRONG)  # the id any review task of the pair has
        assert task["reason"].startswith("neighbour_of_error: silver now uncertain") and CORRECTED in task["reason"]
        assert task["pair"]["metadata"]["flipped"] == "true"  # the whole pair, as the stream had it
        assert task["similar"][0]["pair_id"] == CORRECTED and task["similar"][0]["label_source"] == "human"
        assert task["similar"][0]["chosen"] == corrected["rejected"]  # shown as the humans decided it

        # The same verdict read again (a replay, or a second copy) sends nothing more.
        _produce_verified(settings, verified, "flipped")
        _step_until(exp)
        again = [t for t in read_topic(settings, topics.REVIEW, "ReviewTask", idle=2)
                 if t["reason"].startswith(neighbour_tasks.REASON)]
        assert len(again) == 1
    finally:
        exp.close()


@pytest.mark.integration
def test_the_store_keeps_the_newest_pairs_and_refills_an_index(settings):
    from streams.runtime.retrieval.index import NeighbourIndex
    from streams.runtime.retrieval.store import entry

    r = redis.Redis.from_url(settings.redis_url)
    store = IndexStore(r, settings.topic_prefix, capacity=3, dim=4)
    vecs = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    score = {"p": 0.9, "reward_chosen": 1.0, "reward_rejected": 0.0, "model_version": "v1"}
    long_text = "x" * 40_000
    for i, vec in enumerate(vecs):
        pair = {"pair_id": f"p{i}", "conversation": [{"role": "user", "content": f"q{i}"}], "chosen": "a",
                "rejected": long_text if i == 4 else "b", "label_source": "synthetic"}
        store.save(vec[None], [entry(pair, score, "silver")])
    assert set(store.get([f"p{i}" for i in range(5)])) == {"p2", "p3", "p4"}  # the two oldest went
    assert not store.get(["p4"])["p4"].whole and store.get(["p3"])["p3"].whole
    index = NeighbourIndex(4)
    assert store.load(index) == 3
    assert [n["pair_id"] for n in index.search(np.eye(4, dtype=np.float32)[3], 1)] == ["p3"]


def _review_tasks_of(settings, ids: set[str], timeout: float = 120) -> list[dict]:
    """The review tasks (not audits) of ``ids``, read until each has one."""
    from streams.kafka.reader import TopicReader

    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with TopicReader(settings.topic(topics.REVIEW), "ReviewTask", settings) as reader:
        for record in reader.decoded(idle_timeout=timeout):
            t = record.value
            if t["pair"]["pair_id"] in ids and not t["reason"].startswith("audit"):
                found.setdefault(t["pair"]["pair_id"], t)
            if set(found) == ids or time.monotonic() > deadline:
                break
    assert set(found) == ids, f"{len(ids - set(found))} of {len(ids)} pairs never reached review"
    return list(found.values())


@pytest.mark.integration
def test_a_worker_killed_and_restarted_serves_similar_pairs_from_its_first_task(settings):
    from streams.sdk import PreferenceProducer
    from tests.helpers import WorkerProcess, wait_for_scored

    # Pairs far apart in content: ingest dead-letters a near-duplicate, and each must be routed.
    things = ["a red bicycle", "the winter sea", "an old oak desk", "my grandmother's garden", "a jazz trumpet",
              "the night train to Vienna", "a bowl of ramen", "the chess club", "a paper kite"]

    def pairs(tag: str, chosen: list[str]) -> list[dict]:
        return [{"pair_id": f"{tag}-{i}", "prompt": f"Say something kind about {thing}.",
                 "chosen": f"{thing.capitalize()} deserves praise: it brings quiet joy ({tag} {i}).",
                 "rejected": "No."} for i, thing in enumerate(chosen)]

    worker = WorkerProcess(settings, extra_env={"PREFSTREAM_WORKER_AUDIT_SHARE": "0"}).start()
    try:
        with PreferenceProducer(settings) as producer:
            before = {producer.send(p) for p in pairs("before", things[:6])}
        wait_for_scored(settings, before, timeout=120)
        worker.kill9()
        worker.start()
        with PreferenceProducer(settings) as producer:
            after = {producer.send(p) for p in pairs("after", things[6:])}
        scored = {r["pair"]["pair_id"]: r for r in wait_for_scored(settings, after, timeout=120)}
        reviewed = {pid for pid, r in scored.items() if pid in after and r["route"] == "review"}
        assert reviewed, "the bootstrap model sent none of the pairs to review; the test needs review tasks"
        # The index is filled after a batch is routed: without the Redis copy, the first batch's tasks get none.
        for task in _review_tasks_of(settings, reviewed):
            assert task["similar"], f"review task of {task['pair']['pair_id']} has no similar pairs after the restart"
            assert {s["pair_id"] for s in task["similar"]} & before
    finally:
        worker.stop()


def test_the_report_counts_planted_noise_found_through_a_neighbour():
    from streams.local.report import neighbour_expansion
    from streams.local.report_files import _expansion_line

    stream = [{"pair_id": i, "chosen": f"good {i}", "rejected": f"bad {i}",
               "metadata": {"flipped": "true" if i in ("n1", "n2") else "false"}} for i in ("n1", "n2", "n3", "x")]
    why = neighbour_tasks.reason("silver", "now uncertain (guided p=0.6)")
    tasks = [{"pair": {"pair_id": i}, "reason": why} for i in ("n1", "n2", "n3")] + [
        {"pair": {"pair_id": "x"}, "reason": "mispredicted"}]
    gold = {"n1": {"pair": {"pair_id": "n1", "chosen": "bad n1"}},  # the humans swapped the planted flip back
            "n3": {"pair": {"pair_id": "n3", "chosen": "good n3"}}}
    counts = neighbour_expansion(tasks, stream, gold)
    assert counts == {"tasks": 3, "planted_noise": 2, "planted_noise_corrected": 1}
    assert "3, 2 of them planted noise, 1 of those corrected" in _expansion_line(counts)
    assert _expansion_line(None) == ""
