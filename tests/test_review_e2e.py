"""The review app as a real process: a real browser (headless Chromium) and simulated annotators."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from streams.kafka import topics
from tests.fake_llm import FakeJudge
from tests.helpers import (
    REVIEW_SECRETS,
    ROOT,
    annotator_get,
    publish_tasks,
    read_topic,
    review_task,
    running_review_app,
    wait_pending,
)

pytestmark = pytest.mark.integration
@pytest.fixture
def review_app(settings, tmp_path):
    with running_review_app(settings, tmp_path) as app:
        yield app


def test_simulated_annotators_drain_the_queue_into_gold(settings, review_app, tmp_path):
    url, env = review_app
    tasks = [review_task(100 + i) for i in range(12)]
    truth = tmp_path / "truth.jsonl"
    truth.write_text("\n".join(json.dumps(t["pair"]) for t in tasks))
    publish_tasks(settings, tasks)
    wait_pending(url, 12)
    out = subprocess.run([sys.executable, "-m", "streams.cli", "annotate", "--simulate", "3", "--accuracy", "1.0",
                          "--truth", str(truth), "--url", url, "--idle", "3"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["answered"] == 36 and stats["correct"] == 36 and sorted(stats["per_annotator"].values()) == [12, 12, 12], (
        out.stdout[-3000:], out.stderr[-3000:], annotator_get(url + "/api/stats"))
    deadline = time.monotonic() + 60
    while len(verified := read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=1)) < 12:
        assert time.monotonic() < deadline, f"only {len(verified)} verified"
    assert {v["decided_by"] for v in verified} == {"unanimous"} and {v["label"] for v in verified} == {"kept"}
    page = annotator_get(url + "/stats").decode()
    assert ">1.0000<" in page  # rolling alpha on the stats page: perfect agreement
    table = page.split("<main>")[1]
    annotators = table.split("<h2>Annotators</h2>")[1].split("</table>")[0]
    assert '<td id="throughput">36</td>' in page and annotators.count("<td>1.000</td>") == 3, (  # per-annotator agreement
        table + out.stdout[-3000:] + out.stderr[-3000:] + (tmp_path / "review.log").read_text()[-3000:])


def test_noisy_annotators_and_an_expert_end_every_task_verified(settings, review_app, tmp_path):
    url, env = review_app
    tasks = [review_task(300 + i) for i in range(20)]
    truth = tmp_path / "truth.jsonl"
    truth.write_text("\n".join(json.dumps(t["pair"]) for t in tasks))
    publish_tasks(settings, tasks)
    wait_pending(url, 20)
    out = subprocess.run([sys.executable, "-m", "streams.cli", "annotate", "--simulate", "3", "--accuracy", "0.6",
                          "--experts", "1", "--truth", str(truth), "--url", url, "--idle", "6"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    deadline = time.monotonic() + 60
    while len(verified := read_topic(settings, topics.VERIFIED, "VerifiedPair", idle=1)) < 20:
        assert time.monotonic() < deadline, (f"only {len(verified)} of 20 tasks ended verified", out.stdout[-2000:],
                                             out.stderr[-2000:], annotator_get(url + "/api/stats"))
    by = {v["pair"]["pair_id"]: v for v in verified}
    assert set(by) == {t["task_id"] for t in tasks}
    assert {v["decided_by"] for v in verified} <= {"unanimous", "majority", "expert"}
    for v in verified:
        if v["decided_by"] == "expert":
            assert v["label"] == "kept"  # the simulated expert knows the truth


@pytest.fixture
def judge():
    fake = FakeJudge(marker="**plain**", rationale='<img src=x onerror="window.pwned=3"> Response {n} is plain.')
    yield fake
    fake.close()


def test_browser_sign_in_click_keyboard_escaping_and_wrong_token(settings, tmp_path, browser, judge):
    """Also what helps the annotator: the margin in their A/B order, a similar pair's human label and
    the LLM judge's opinion (from a local endpoint in the chat-completions shape), all as text."""
    import redis

    from streams.review.aggregator import Aggregator

    hostile = review_task(200, prompt="<script>window.pwned=1</script>", chosen='<img src=x onerror="window.pwned=2">',
                   rejected="**plain** <b>text</b>")
    hostile["pair"]["conversation"] = [{"role": "user", "content": "<script>window.pwned=1</script>"}]
    hostile["similar"] = [{"pair_id": "pair-199", "prompt": "<b>similar</b> question", "chosen": "yes",
                           "rejected": "no", "label_source": "human", "similarity": 0.87}]
    agg = Aggregator(redis.Redis.from_url(settings.redis_url), settings.topic_prefix)
    similar = review_task(199) | {"task_id": agg.task_ids.of("pair-199")}  # the similar pair's own review task
    for who, side in (("x", "rejected"), ("y", "rejected"), ("z", "chosen")):
        agg.handle({"task_id": similar["task_id"], "annotator": who, "preferred": side}, task=similar)
    agg.committed()
    with running_review_app(settings, tmp_path, {"PREFSTREAM_REVIEW_JUDGE_URL": judge.url}) as (url, _):
        publish_tasks(settings, [hostile, review_task(201)])
        wait_pending(url, 2)
        browse_and_answer(settings, url, browser)


def browse_and_answer(settings, url, browser):
    page = browser.new_page()
    page.goto(url + "/annotate")
    page.fill("#token", "wrong-token-123")
    page.click("#signin-btn")
    page.wait_for_selector("#signin-error:has-text('refused')")
    page.fill("#token", REVIEW_SECRETS["alice"])
    page.click("#signin-btn")
    page.wait_for_selector("#task:not([hidden])")
    shown_a = page.text_content("#A-src")  # the source; #A holds the rendered markdown
    assert page.text_content("#margin") == ("-0.500" if shown_a.startswith("<img") else "0.500")  # reward A - reward B
    assert page.text_content("#similar .verified") == (
        " — verified: annotators preferred the response shown as rejected (2 of 3 annotator verdicts)")
    assert "<b>similar</b> question" in page.text_content("#similar")
    page.wait_for_selector("#judge:not([hidden])")
    assert "not a vote" in page.text_content("#judge")
    assert page.text_content("#judge-verdict") == ("Response A" if shown_a.startswith("**plain**") else "Response B")
    assert page.text_content("#judge-rationale").startswith('<img src=x onerror="window.pwned=3"> Response ')
    first = page.text_content("#conversation")
    assert "<script>window.pwned=1</script>" in first  # shown as text...
    assert page.evaluate("window.pwned") is None  # ...and never run
    assert '<img src=x onerror="window.pwned=2">' in (page.text_content("#A") + page.text_content("#B"))
    page.click("button[data-v='A']")  # by click
    page.wait_for_function("document.getElementById('conversation').textContent.includes('Question 201')")
    page.keyboard.press("6")  # by keyboard: B clearly better
    page.wait_for_selector("#empty:not([hidden])")
    anns = read_topic(settings, topics.ANNOTATIONS, "Annotation")
    assert [(a["task_id"], a["verdict"]) for a in anns] == [("pair-200", "A"), ("pair-201", "B")]
    assert page.evaluate("window.pwned") is None
    page.click("header a[href='/stats']")  # signed in: the stats link works without a Bearer header
    page.wait_for_selector("#verdicts:has-text('2')")
    assert page.evaluate("window.pwned") is None


def test_stats_page_charts_in_a_browser(settings, tmp_path, browser):
    """The charts come from what the workers, the queue, the aggregator and the model store recorded; a
    category named like a script shows as text."""
    import redis

    from streams import history
    from streams.review.aggregator import alpha_by_category_key
    from streams.review.queue import ReviewQueue
    from trainers.scoring.model import RewardModel

    r = redis.Redis.from_url(settings.redis_url)
    now = time.time()
    for minutes_ago, counts in ((3, {"review": 2, "silver": 6}), (1, {"review": 1, "flipped": 1, "deferred": 4})):
        history.add(r, settings.topic_prefix, history.ROUTES, counts, now - 60 * minutes_ago)
    queue = ReviewQueue(r, settings.topic_prefix)
    for i, p in ((300, 0.1), (301, 0.4)):
        queue.add(review_task(i, p=p) | {"created_at": int((now - 90) * 1000)})
    for who in ("a", "b", "c"):  # pair-300 gets its three verdicts: closed, 90 s after it was routed
        assert queue.lease(who)["task_id"] == "pair-300"
        queue.submit("pair-300", who, {"preferred": "chosen"})
    hostile = "<img src=x onerror=window.pwned=1>"
    r.hset(alpha_by_category_key(settings.topic_prefix), mapping={"math": 0.8, hostile: 0.4})
    store = settings.model_store()
    src = RewardModel.default(max_length=32).save(tmp_path / "model")
    for acc in (0.7, 0.9):
        store.publish(src, "current", metrics={"holdout_accuracy": acc}, calibration={"ece": 0.1})

    with running_review_app(settings, tmp_path) as (url, _):
        context = browser.new_context()
        context.add_cookies([{"name": "prefstream-token", "value": REVIEW_SECRETS["alice"], "url": url + "/stats"}])
        page = context.new_page()
        page.goto(url + "/stats?minutes=10")
        for chart in ("routes-chart", "human-share-chart", "queue-chart", "age-chart", "versions-chart",
                      "categories-chart"):
            box = page.locator(f"svg#{chart}").bounding_box()
            assert box and box["width"] > 200 and box["height"] > 50, chart  # drawn, not just present

        def titles(selector: str) -> list[str]:
            return page.eval_on_selector_all(selector + " title", "els => els.map(e => e.textContent)")

        share = titles("#human-share-chart g[data-series='human share']")
        assert [t.rsplit(": ", 1)[1] for t in share] == ["0.25", "0.5"]  # 2 of 8; 1 of 2 (deferred left out)
        assert len(titles("#routes-chart g[data-series='silver'] circle")) == 10  # every minute of the window
        assert titles("#queue-chart g[data-series='open tasks'] circle")[-1].endswith(": 1")
        age = titles("#age-chart g[data-series='mean age']")
        assert len(age) == 1 and 1.4 < float(age[0].rsplit(": ", 1)[1].split()[0]) < 2.5  # about 90 s
        assert [t.rsplit(": ", 1)[1] for t in titles("#versions-chart g[data-series='holdout accuracy']")] == ["0.7",
                                                                                                             "0.9"]
        assert f"alpha, {hostile}: 0.4" in titles("#categories-chart g[data-series='alpha']")
        assert page.evaluate("window.pwned") is None
        context.close()
