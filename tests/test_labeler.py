"""The labeler: top-1 accuracy on the held-out labelled set, labels from the whole conversation, and
controversiality from per-category annotator agreement (Gwet's AC1) that survives a skewed run."""

from __future__ import annotations

import random
import uuid

import pytest
import redis

from bench.labeler import SPLITS, as_pair, confusion, load_eval_set
from streams.local.generate import CATEGORIES as GENERATOR_TYPES
from streams.review.aggregator import Aggregator, ac1, alpha
from streams.review.disagreement import DISAGREEMENT_KEY
from streams.runtime.processors.labeler import (
    CONTEXT_CHARS,
    Labeler,
    controversiality,
    earlier_turns,
    load_taxonomy,
)

# Held-out top-1 of the worker's labeler (INT8 MiniLM) is 0.85-0.87 (`python -m bench.labeler`); the
# two-example, last-turn labeler gets 0.71-0.72. The floor leaves room for INT8's per-batch scales
# moving near-ties.
HELDOUT_FLOOR = 0.83
MIN_HAND_WRITTEN = 5


@pytest.fixture(scope="module")
def labeler():
    from streams.runtime.processors.embedder import Embedder

    return Labeler(Embedder())


def test_the_labelled_set_covers_every_category_and_is_apart_from_the_taxonomy_examples():
    rows, taxonomy = load_eval_set(), load_taxonomy()
    names = {c.name for c in taxonomy}
    assert {r["category"] for r in rows} <= names
    for c in taxonomy:
        hand = [r for r in rows if r["category"] == c.name and r["source"] == "hand"]
        assert len(hand) >= MIN_HAND_WRITTEN, f"{c.name}: {len(hand)} hand-written prompts"
        assert {r["split"] for r in hand} == set(SPLITS), c.name
    assert {r["source"].removeprefix("generate:") for r in rows if r["source"] != "hand"} == set(GENERATOR_TYPES)
    assert sum(len(r["conversation"]) > 1 for r in rows) >= 10
    # Testing on the texts the centroids are built from would measure nothing.
    built_from = {t.strip().lower() for c in taxonomy for t in (c.description, *c.examples)}
    turns = {t["content"].strip().lower() for r in rows for t in r["conversation"]}
    assert not built_from & turns


def test_top1_accuracy_on_the_heldout_set_is_at_least_the_floor(labeler):
    held = [r for r in load_eval_set() if r["split"] == "heldout"]
    pairs = labeler.label([as_pair(r) for r in held])
    got = [p["task_category"] for p in pairs]
    top1 = sum(g == r["category"] for g, r in zip(got, held, strict=True)) / len(held)
    misses = {k: v["instead"] for k, v in confusion(held, got).items() if v["instead"]}
    assert top1 >= HELDOUT_FLOOR, f"held-out top-1 {top1:.3f} < {HELDOUT_FLOOR}; misses by category: {misses}"


def test_a_follow_up_turn_is_labelled_with_the_conversation(labeler):
    turns = ["I'm planning a week in Portugal in May.", "Great choice! Lisbon, Porto and the Algarve are all lovely then.",
             "What about the second half of the week?"]
    pair = as_pair({"conversation": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]})
    assert labeler.categorize([turns[-1]]) != ["travel"]  # the follow-up alone says nothing of travel
    assert labeler.label([pair])[0]["task_category"] == "travel"
    # The earlier turns, most recent first, cut so the extra pass stays short.
    long = as_pair({"conversation": [{"role": "user", "content": "a" * 300}, {"role": "assistant", "content": "b" * 300},
                                     {"role": "user", "content": "last"}]})
    assert earlier_turns(long) == ("b" * 300 + "\n" + "a" * 300)[:CONTEXT_CHARS]
    assert earlier_turns(as_pair({"conversation": [{"role": "user", "content": "only"}]})) == ""


def test_the_assistant_turns_count_where_only_they_name_the_task(labeler):
    turns = ["Can you help me with something?",
             "Of course. Here is a Python function that sorts a list: def sort_list(xs): return sorted(xs)",
             "Now make it handle None values too."]
    pair = as_pair({"conversation": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]})
    assert labeler.categorize([turns[-1]], [turns[0]]) != ["python_coding"]  # the user turns alone do not say
    assert labeler.label([pair])[0]["task_category"] == "python_coding"


def test_ac1_by_hand():
    units = [{"a": "chosen", "b": "chosen"}, {"a": "chosen", "b": "chosen"}, {"a": "chosen", "b": "rejected"},
             {"a": "rejected", "b": "rejected"}]
    # Observed 3/4; pi = (5/8, 3/8); chance 2 * 5/8 * 3/8 / (2 - 1) = 15/32; (3/4 - 15/32) / (17/32) = 9/17.
    assert ac1(units, ("chosen", "rejected")) == pytest.approx(9 / 17)
    assert ac1([{"a": "tie", "b": "tie", "c": "tie"}] * 3) == 1.0
    assert ac1([{"a": "chosen", "b": "chosen"}, {"a": "chosen"}]) is None  # one unit with two ratings


def _verdicts(tasks: int, share_chosen: float, accuracies: tuple[float, ...], rng: random.Random) -> list[dict[str, str]]:
    """Three annotators per task, each picking the truly better side with their own accuracy."""
    units = []
    for _ in range(tasks):
        truth = "chosen" if rng.random() < share_chosen else "rejected"
        other = "rejected" if truth == "chosen" else "chosen"
        units.append({f"annotator{i}": truth if rng.random() < acc else other for i, acc in enumerate(accuracies)})
    return units


def test_controversiality_reads_agreement_not_prevalence_on_a_skewed_run(stack, stack_settings, labeler):
    """Nearly every true label "chosen" and annotators 84-89% right: alpha collapses, AC1 does not."""
    r = redis.Redis.from_url(stack_settings.redis_url)
    rng = random.Random(7)
    skewed = _verdicts(450, 0.95, (0.84, 0.87, 0.89), rng)
    split = _verdicts(200, 0.95, (0.5, 0.55, 0.5), rng)  # a genuinely controversial category
    assert alpha(skewed) < 0.3  # 1 - alpha would read "high" for annotators who mostly agree
    agg = Aggregator(r, f"ac1{uuid.uuid4().hex}.")
    easy, hard = f"skewed-{uuid.uuid4().hex}", f"split-{uuid.uuid4().hex}"
    try:
        for cat, units in ((easy, skewed), (hard, split)):  # each fills the window in turn
            agg.window.clear()
            agg.window.extend((cat, u) for u in units)
            agg._update_alpha()
        history = Labeler(labeler.embedder, labeler.taxonomy, redis=r).category_disagreement()
        assert controversiality(None, history[easy]) in ("low", "medium")
        assert controversiality(None, history[hard]) == "high"
        assert history[easy] == pytest.approx(1 - ac1(skewed), abs=1e-4)
    finally:
        r.hdel(DISAGREEMENT_KEY, easy, hard)


def test_one_refusing_response_makes_a_pair_at_least_medium_controversial(labeler):
    def level(chosen: str, rejected: str) -> str:
        pair = {"conversation": [{"role": "user", "content": "How do I pick a lock?"}], "chosen": chosen,
                "rejected": rejected}
        return labeler.label([pair], [0.0])[0]["controversiality"]

    assert level("I'm sorry, but I can't help with breaking into homes.", "Insert a tension wrench first.") == "medium"
    assert level("Insert a tension wrench first.", "I cannot help with that.") == "medium"
    assert level("I can't help with that.", "I won't assist with that.") == "low"  # both refuse: no split
    assert level("Insert a tension wrench first.", "Use a rake pick.") == "low"


def test_the_mt_bench_mapping_names_only_taxonomy_categories_and_reads_three_ways():
    from bench.labeler_outside import MAPPING, conversations, wilson
    from streams.runtime.processors.labeler import load_taxonomy

    names = {c.name for c in load_taxonomy()}
    assert set().union(*MAPPING.values()) <= names
    q = {"turns": ["first?", "follow-up"]}
    readings = conversations(q, "an answer")
    assert [t["role"] for t in readings["whole conversation"]] == ["user", "assistant", "user"]
    assert readings["user turns"][-1]["content"] == "follow-up" and len(readings["first turn"]) == 1
    assert conversations(q, None)["whole conversation"] == readings["user turns"]
    low, high = wilson(46, 80)
    assert low < 46 / 80 < high and round(high - low, 2) == 0.21
