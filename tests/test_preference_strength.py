"""Preference strength and ties: the API and page take them, the aggregator decides with them, the
shards keep them, and a retrain turns strength into the Bradley-Terry margin."""

from __future__ import annotations

import time

import pytest
import redis

from schemas.records import STRENGTHS, UNRANKED_SPLITS
from streams.kafka import topics
from streams.review.aggregator import Aggregator, combined_strength, decide, final_key
from streams.review.render import markdown_html
from tests.helpers import (
    REVIEW_SECRETS,
    auth,
    make_client,
    publish_tasks,
    read_topic,
    review_task,
    running_review_app,
    unique_pairs,
    wait_pending,
)
from trainers.exceptions import DataError
from trainers.storage.shards import PartitionLog, write_summary
from trainers.training.data import STRENGTH_MARGIN, read_pairs, shard_pair

TOPIC = "t.prefs.curated"


def test_the_margin_table_covers_every_strength_in_order():
    assert list(STRENGTH_MARGIN) == list(STRENGTHS)
    margins = list(STRENGTH_MARGIN.values())
    assert margins == sorted(margins) and margins[0] == 0.0


@pytest.mark.parametrize(("given", "combined"), [
    (["much", "clearly", "slightly"], "clearly"),
    (["much", "much", None], "much"),  # a vote without a strength is not counted
    (["much", "slightly"], "slightly"),  # of two, the weaker: half the rated votes hold no more
    (["clearly", None], "clearly"),
    ([None, None], None),
    (["enormous", "much"], "much"),  # not on the scale: not counted
])
def test_combined_strength_is_the_lower_median_of_the_rated_votes(given, combined):
    assert combined_strength(given) == combined


def test_majorities_for_tie_and_both_bad_decide_and_invalid_still_escalates():
    assert (decide(["tie", "tie", "chosen"]).kind, decide(["tie", "tie", "chosen"]).preferred) == ("verified", "tie")
    assert decide(["both_bad"] * 3).preferred == "both_bad" and decide(["both_bad"] * 3).decided_by == "unanimous"
    assert decide(["invalid", "invalid", "chosen"]).kind == "escalate"
    assert decide(["tie", "both_bad", "chosen"]).kind == "escalate"
    assert decide(["both_bad"], expert=True).preferred == "both_bad"
    assert decide(["invalid"], expert=True).kind == "discarded"


# ------------------------------------------------------------------ the aggregator, on the session's Redis
@pytest.fixture
def agg(stack, stack_settings):
    r = redis.Redis.from_url(stack_settings.redis_url)
    prefix = f"strength{time.monotonic_ns()}."
    return Aggregator(r, prefix), r, prefix


def vote(t: dict, who: str, preferred: str, strength: str | None = None, **extra) -> dict:
    return {"task_id": t["task_id"], "annotator": who, "preferred": preferred, "strength": strength} | extra


def outputs(out: list) -> dict[str, dict]:
    return {name: rec for name, _, rec in out}


def test_the_majoritys_median_strength_reaches_verified_and_curated(agg):
    a, _, _ = agg
    t = review_task(1)
    a.handle(vote(t, "x", "rejected", "much"), t)
    a.handle(vote(t, "y", "chosen", "much"), t)  # the minority's strength does not count
    out = outputs(a.handle(vote(t, "z", "rejected", "slightly"), t))
    v, c = out["prefs.verified"], out["prefs.curated"]
    assert (v["label"], v["strength"]) == ("flipped", "slightly")  # much and slightly: the weaker
    assert (c["split"], c["strength"], c["pair"]["chosen"]) == ("gold", "slightly", "bad answer 1")


def test_a_tie_majority_is_kept_with_its_verdict_as_the_task_showed_it(agg):
    a, r, prefix = agg
    t = review_task(2)
    a.handle(vote(t, "x", "tie"), t)
    a.handle(vote(t, "y", "chosen", "much"), t)
    out = outputs(a.handle(vote(t, "z", "tie"), t))
    assert "prefs.review" not in out, "a tie majority is a decision, not an escalation"
    v, c = out["prefs.verified"], out["prefs.curated"]
    assert (v["label"], v["decided_by"], v["strength"]) == ("tie", "majority", None)
    assert (c["split"], c["strength"], c["pair"]["chosen"], c["pair"]["label_source"]) == (
        "tie", None, "good answer 2", "human")
    a.committed()
    assert r.hget(final_key(prefix), "pair-2") == b"tie"  # similar pairs show it; re-annotation compares with it


def test_the_expert_decides_both_bad_or_a_side_with_their_own_strength(agg):
    a, _, _ = agg
    t = review_task(3)
    for who, side in (("x", "chosen"), ("y", "rejected"), ("z", "invalid")):
        out = outputs(a.handle(vote(t, who, side, "much" if side == "chosen" else None), t))
    expert = out["prefs.review"]
    got = outputs(a.handle(vote(expert, "erin", "both_bad", expert=True), expert))
    assert got["prefs.curated"]["split"] == "both_bad" and got["prefs.verified"]["label"] == "both_bad"
    t4 = review_task(4)
    for who, side in (("x", "chosen"), ("y", "rejected"), ("z", "tie")):
        out = outputs(a.handle(vote(t4, who, side, None if side == "tie" else "slightly"), t4))
    expert = out["prefs.review"]
    got = outputs(a.handle(vote(expert, "erin", "rejected", "much", expert=True), expert))
    assert (got["prefs.curated"]["split"], got["prefs.curated"]["strength"]) == ("gold", "much")


def test_a_tie_majority_on_an_audit_counts_as_a_split_not_against_the_automatic_label(agg):
    from streams.review import audit

    a, r, prefix = agg
    t = dict(review_task(5, task_category="math"), task_id="audit-task-5", reason="audit:silver")
    for who in ("x", "y", "z"):
        assert a.handle(vote(t, who, "tie"), t) == []
    a.committed()
    count = audit.read(r, prefix)[("math", "silver")]
    assert (count.right, count.wrong, count.split) == (0, 0, 1)


# ------------------------------------------------------------------ the API
@pytest.mark.integration
def test_the_api_takes_strength_with_a_side_and_refuses_what_does_not_fit(settings):
    with make_client(settings) as client:
        for i in (10, 11, 12):
            client.queue.add(review_task(i))
        t = client.get("/api/tasks/next", headers=auth("alice")).json()
        url = f"/api/tasks/{t['task_id']}/verdict"
        r = client.post(url, json={"verdict": "tie", "strength": "much"}, headers=auth("alice"))
        assert r.status_code == 422 and "strength 'much' goes with verdict A or B" in r.text
        r = client.post(url, json={"verdict": "A", "strength": "enormous"}, headers=auth("alice"))
        assert r.status_code == 422 and "slightly" in r.text and "much" in r.text
        assert client.post(url, json={"verdict": "B", "strength": "much"}, headers=auth("alice")).status_code == 200
        sent = {t["task_id"]: ("B", "much")}
        for verdict in ("tie", "A"):  # no strength: stored as null (the margin of such a vote is 0)
            t = client.get("/api/tasks/next", headers=auth("alice")).json()
            assert client.post(f"/api/tasks/{t['task_id']}/verdict", json={"verdict": verdict},
                               headers=auth("alice")).status_code == 200
            sent[t["task_id"]] = (verdict, None)
    anns = read_topic(settings, topics.ANNOTATIONS, "Annotation")
    assert {a["task_id"]: (a["verdict"], a["strength"]) for a in anns} == sent


def test_responses_are_rendered_as_markdown_and_nothing_in_them_can_run():
    html = markdown_html("## Answer\n\n**bold** [ok](https://example.org) [bad](javascript:alert(1))\n\n"
                         "<script>alert(1)</script>\n\n<img src=x onerror=alert(2)>\n\n![pixel](https://example.org/p.png)")
    assert "<h2>Answer</h2>" in html and "<strong>bold</strong>" in html
    assert '<a href="https://example.org" rel="noopener noreferrer nofollow">ok</a>' in html
    assert "<script" not in html and "<img" not in html and 'href="javascript' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # raw HTML is shown as text


# ------------------------------------------------------------------ shards and the retrain
def curated(pair: dict, split: str, strength: str | None) -> dict:
    return {"pair": pair, "split": split, "p": None, "model_version": None, "reason": "human majority (0.67)",
            "strength": strength, "curated_at": 0}


def test_a_retrain_pair_from_a_much_shard_row_has_margin_1_and_the_loss_uses_it(tmp_path):
    from trainers.retrain import RetrainConfig
    from trainers.storage.registry import ModelStore
    from trainers.training.selection import CURRENT_SPLITS, GOLD_SPLITS, collect, in_gold_holdout
    from trainers.training.train import TrainConfig, train

    assert not set(UNRANKED_SPLITS) & set(CURRENT_SPLITS + GOLD_SPLITS), "ties must never be read as preferences"
    pairs = [p for p in unique_pairs(40) if not in_gold_holdout(p["pair_id"])][:12]
    root = tmp_path / "shards"
    rows = ([curated(p, "gold", "much") for p in pairs[:6]] + [curated(p, "gold", None) for p in pairs[6:9]]
            + [curated(pairs[9], "tie", None), curated(pairs[10], "both_bad", None), curated(pairs[11], "silver", None)])
    PartitionLog(root, TOPIC, 0, roll_records=100, roll_age_s=1e9).append(list(enumerate(rows)), len(rows))
    assert write_summary(root)["totals"] == {"gold": 9, "tie": 1, "both_bad": 1, "silver": 1}  # `prefstream shards`

    assert shard_pair(rows[0])["extra"] == {"split": "gold", "margin": 1.0}
    assert shard_pair(rows[6])["extra"] == {"split": "gold"}  # no strength: margin 0 in the loss
    with pytest.raises(DataError, match="strength 'huge'.*slightly, clearly, much"):
        shard_pair(dict(rows[0], strength="huge"))
    got = collect(RetrainConfig(role="current", shards_dir=str(root), models_dir=str(tmp_path / "m")),
                  ModelStore(tmp_path / "m"))
    trained = list(got.pairs) + list(getattr(got, "validation", []))
    margins = {p["pair_id"]: (p.get("extra") or {}).get("margin") for p in trained}
    assert set(margins) == {p["pair_id"] for p in pairs[:9]} | {pairs[11]["pair_id"]}  # no tie, no both_bad
    assert all(margins[p["pair_id"]] == 1.0 for p in pairs[:6]) and all(margins[p["pair_id"]] is None for p in pairs[6:9])
    read = read_pairs([root])  # `prefstream train` on a shards root: the same pairs, ties left out
    assert {p["pair_id"] for p in read} == set(margins)

    # The loss is -log sigmoid(r_c - r_r - margin): at the same start a margin of 1 raises it by about
    # log(1 + e) - log 2 = 0.62 where r_c - r_r is near 0 (the untrained head).
    much = [shard_pair(r) for r in rows[:6]]
    plain = [dict(p, extra={"split": "gold"}) for p in much]
    base = dict(max_steps=1, batch_size=6, max_length=48, eval_every=0, progress=False, plot=False, seed=1)
    loss_plain = train(TrainConfig(output_dir=str(tmp_path / "a"), **base), plain, plain[:2]).history[0]["loss"]
    loss_much = train(TrainConfig(output_dir=str(tmp_path / "b"), **base), much, much[:2]).history[0]["loss"]
    assert loss_much == pytest.approx(loss_plain + 0.62, abs=0.15)


# ------------------------------------------------------------------ the page, in headless Chromium
MARKDOWN = ("## Answer\n\nThe capital is **Paris**.\n\n<script>window.pwned=1</script>\n\n"
            '<img src=x onerror="window.pwned=2">\n\n[more](javascript:window.pwned=3)')


@pytest.mark.integration
def test_the_page_renders_markdown_safely_toggles_the_source_and_submits_strength_and_ties(
        settings, tmp_path, browser):  # noqa: F811  (the imported fixture)

    tasks = [review_task(300, chosen=MARKDOWN, rejected="Paris."), review_task(301), review_task(302), review_task(303)]
    with running_review_app(settings, tmp_path) as (url, _):
        publish_tasks(settings, tasks)
        wait_pending(url, len(tasks))
        page = browser.new_page()
        page.goto(url + "/annotate")
        page.fill("#token", REVIEW_SECRETS["alice"])
        page.click("#signin-btn")
        page.wait_for_selector("#task:not([hidden])")
        assert "Question 300" in page.text_content("#conversation")
        side = "A" if page.text_content("#A-src") == MARKDOWN else "B"
        assert page.text_content(f"#{side} h2") == "Answer"  # a heading, not "## Answer"
        assert page.text_content(f"#{side} strong") == "Paris"
        assert "<script>window.pwned=1</script>" in page.text_content(f"#{side}")  # raw HTML shown as text
        assert page.eval_on_selector_all("#A script, #B script, #A img, #B img, #A [onerror], #B [onerror], "
                                         "#A a[href^='javascript'], #B a[href^='javascript']", "els => els.length") == 0
        assert page.locator(f"#{side} a").count() == 0  # the javascript: link stays text
        assert page.evaluate("window.pwned") is None
        assert page.is_hidden(f"#{side}-src") and page.is_visible(f"#{side}")
        page.click("#source-toggle")  # the source, as the pair has it
        assert page.is_visible(f"#{side}-src") and page.is_hidden(f"#{side}")
        assert page.inner_text(f"#{side}-src").startswith("## Answer\n\nThe capital is **Paris**.")
        page.keyboard.press("s")  # and back, by key
        assert page.is_hidden(f"#{side}-src") and page.is_visible(f"#{side}")
        answered = {}
        for key, expected in (("7", ("B", "much")), ("4", ("tie", None)), ("8", ("both_bad", None)),
                              ("2", ("A", "clearly"))):
            shown = page.text_content("#conversation")
            page.keyboard.press(key)
            answered[shown.split("Question ")[1].split("?")[0]] = expected
            if len(answered) < len(tasks):
                page.wait_for_function(f"!document.getElementById('conversation').textContent.includes({shown!r})")
        page.wait_for_selector("#empty:not([hidden])")
        assert page.evaluate("window.pwned") is None
    anns = read_topic(settings, topics.ANNOTATIONS, "Annotation")
    assert {a["pair_id"].removeprefix("pair-"): (a["verdict"], a["strength"]) for a in anns} == answered


@pytest.mark.integration
def test_simulated_annotators_give_the_datas_strength_and_ties_and_the_aggregator_keeps_them(settings, tmp_path):
    import json

    from streams.review.simulate import load_truths, simulate

    tie, much, plain = (review_task(400, chosen="Either way works.", rejected="Both ways work."),
                        review_task(401), review_task(402))
    meta = {"pair-400": {"truth": "tie"}, "pair-401": {"truth": "chosen", "strength": "much"},
            "pair-402": {"truth": "chosen"}}
    truth = tmp_path / "truth.jsonl"
    truth.write_text("\n".join(json.dumps(t["pair"] | {"metadata": meta[t["pair"]["pair_id"]]})
                               for t in (tie, much, plain)))
    with running_review_app(settings, tmp_path) as (url, _):
        publish_tasks(settings, [tie, much, plain])
        wait_pending(url, 3)
        stats = simulate(url, [REVIEW_SECRETS[n] for n in ("alice", "bob", "carol")], 1.0, load_truths(truth), idle_s=3)
        assert stats.answered == 9 and stats.correct == 9 and not stats.errors
        deadline = time.monotonic() + 60
        while len(curated := read_topic(settings, topics.CURATED, "CuratedPair", idle=1)) < 3:
            assert time.monotonic() < deadline, f"only {len(curated)} curated"
    anns = read_topic(settings, topics.ANNOTATIONS, "Annotation")
    by_pair = {}
    for a in anns:
        by_pair.setdefault(a["pair_id"], set()).add((a["preferred"], a["strength"]))
    assert by_pair["pair-400"] == {("tie", None)}  # only where the data says the two are equally good
    assert by_pair["pair-401"] == {("chosen", "much")}
    assert {p for p, _ in by_pair["pair-402"]} == {"chosen"} and {s for _, s in by_pair["pair-402"]} <= set(STRENGTHS)
    got = {c["pair"]["pair_id"]: (c["split"], c["strength"]) for c in curated}
    assert got["pair-400"] == ("tie", None) and got["pair-401"] == ("gold", "much")
    assert got["pair-402"][0] == "gold" and got["pair-402"][1] in STRENGTHS
