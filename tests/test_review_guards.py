"""The review app's guards against a hostile annotator or a stranger, on the real app process (uvicorn,
its feeder and aggregator) against the session's broker and Redis: one vote per task and annotator
however many submits race, and unknown tokens rate limited per client address."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest

from streams.kafka import topics
from tests.helpers import (
    REVIEW_SECRETS,
    publish_tasks,
    read_topic,
    review_task,
    running_review_app,
    wait_pending,
)

pytestmark = pytest.mark.integration
RACERS = 8


def call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"} | (headers or {})
                                 | ({"Authorization": f"Bearer {token}"} if token else {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}, dict(r.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw.startswith(b"{") else {}, dict(exc.headers)


def test_concurrent_votes_by_one_annotator_put_exactly_one_annotation_on_the_topic(settings, tmp_path):
    """Eight submits of alice's verdict on one task, released together (half A, half B): one Annotation
    reaches prefs.annotations, and every answer is that one verdict."""
    env = {"PREFSTREAM_REVIEW_RATE_PER_S": "1000"}
    with running_review_app(settings, tmp_path, env) as (url, _):
        publish_tasks(settings, [review_task(80)])
        wait_pending(url, 1)
        status, t, _ = call(url + "/api/tasks/next", token=REVIEW_SECRETS["alice"])
        assert status == 200, t
        start = Barrier(RACERS)

        def submit(i: int) -> tuple[int, dict, dict]:
            start.wait()
            return call(f"{url}/api/tasks/{t['task_id']}/verdict", "POST", {"verdict": "AB"[i % 2]}, REVIEW_SECRETS["alice"])

        with ThreadPoolExecutor(RACERS) as pool:
            answers = list(pool.map(submit, range(RACERS)))
    assert [s for s, _, _ in answers] == [200] * RACERS, answers
    assert len({a["verdict"] for _, a, _ in answers}) == 1, "every answer is the one vote that counted"
    assert sum(not a["duplicate"] for _, a, _ in answers) == 1
    anns = [a for a in read_topic(settings, topics.ANNOTATIONS, "Annotation", idle=1) if a["task_id"] == t["task_id"]]
    assert len(anns) == 1, f"{len(anns)} Annotations of one vote reached Kafka"
    assert anns[0]["verdict"] == answers[0][1]["verdict"]


def test_unknown_tokens_are_rate_limited_per_client_address(settings, tmp_path):
    """60 guesses from one address: 401 up to the bound, then 429 with Retry-After, for a right token
    from that address too; another address (X-Forwarded-For from the trusted local proxy) is unaffected."""
    bound = 10
    with running_review_app(settings, tmp_path, {"PREFSTREAM_REVIEW_UNKNOWN_TOKENS_PER_MIN": str(bound)}) as (url, _):
        # Just after a minute starts, so all 60 fall in one counting window.
        time.sleep((60 - time.time() % 60) % 60 if time.time() % 60 > 50 else 0)
        statuses = [call(url + "/api/tasks/next", token=f"guess-{i:04d}-xxxxxxxxxxxx")[0] for i in range(60)]
        assert statuses == [401] * bound + [429] * (60 - bound), statuses
        status, body, headers = call(url + "/api/tasks/next", token=REVIEW_SECRETS["alice"])
        assert status == 429 and 0 < int(headers["retry-after"]) <= 60, (status, body)
        assert "unknown tokens" in str(body)
        other = {"X-Forwarded-For": "203.0.113.7"}
        assert call(url + "/api/tasks/next", token=REVIEW_SECRETS["alice"], headers=other)[0] == 204
        assert call(url + "/api/tasks/next", token="guess-from-elsewhere-xx", headers=other)[0] == 401
