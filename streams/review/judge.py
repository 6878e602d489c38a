"""The optional LLM judge: a language model's verdict and rationale on a review task, shown to the
annotator as an aid and never counted as a vote.

Off unless PREFSTREAM_REVIEW_JUDGE_URL names an OpenAI-compatible endpoint (vLLM, Ollama, ...),
called the way the worker's LLM labeler calls its endpoint: POST <url>/chat/completions with a
JSON-schema response format.

- When a task is served without a judgement in Redis, the app claims it (SET NX, so one replica
  asks), asks the judge on a background thread and waits at most ``judge_wait_s`` for the answer.
  A slower answer is fetched by the page (GET /api/tasks/{id}/judge) and is there at once for the
  task's later annotators. A failure or a timeout is logged as a warning and the task is served
  without the aid; it is asked again after FAILED_RETRY_S.
- The judge sees the two responses in a random order of its own (a bias towards the first position
  favours neither side). Its verdict is stored relative to the pair (chosen | rejected | tie) and
  shown in each annotator's own A/B order.
- Never a vote: the judgement lives only under the queue's ``judge:<task_id>`` key. Verdicts reach
  the aggregator only as Annotations on prefs.annotations, and the judge never writes one.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from schemas.pairs import clip
from streams.exceptions import JudgeError

log = logging.getLogger(__name__)
JUDGE_TEXT_CHARS = 12_000  # per text sent to the judge: bounds the request whatever the pair's size
RATIONALE_CHARS = 600  # an aid for the annotator, not an essay
FAILED_RETRY_S = 60  # a failed judgement is asked again after this, not on every serve of the task
CLAIM_SLACK_S = 30  # a claim outlives the call's timeout by this much (time queued for a judge thread)
JUDGE_THREADS = 4
SIDES = ("chosen", "rejected")
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["1", "2", "tie"]}, "rationale": {"type": "string"}},
    "required": ["verdict", "rationale"],
}
SYSTEM = ("You help a human annotator compare two responses to the same conversation. Following the guideline, "
          "say which response is better: verdict \"1\" or \"2\", or \"tie\" when neither is better. Give a rationale "
          "of at most two sentences. Answer with JSON only.")


class JudgeClient:
    """Asks an OpenAI-compatible chat endpoint which of two responses is better."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 20.0) -> None:
        import httpx

        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                   headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.url, self.model = base_url, model

    def ask(self, pair: dict[str, Any], first: str, second: str) -> tuple[str, str]:
        """("1" | "2" | "tie", rationale) for ``first`` and ``second`` as responses to ``pair``'s conversation."""
        import httpx

        conversation = "\n\n".join(f"{t['role']}: {t['content']}" for t in pair["conversation"])
        user = (f"Guideline: {pair.get('annotation_guideline') or 'prefer the more helpful, correct and safe response'}"
                f"\n\n## Conversation\n{clip(conversation, JUDGE_TEXT_CHARS)}"
                f"\n\n## Response 1\n{clip(first, JUDGE_TEXT_CHARS)}\n\n## Response 2\n{clip(second, JUDGE_TEXT_CHARS)}")
        body = {"model": self.model, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "judgement", "schema": ANSWER_SCHEMA}}}
        try:
            resp = self.client.post("/chat/completions", json=body)
            resp.raise_for_status()
            out = json.loads(resp.json()["choices"][0]["message"]["content"])
        except httpx.TimeoutException as exc:
            raise JudgeError(f"the LLM judge at {self.url} did not answer within its timeout ({exc}); raise "
                             "PREFSTREAM_REVIEW_JUDGE_TIMEOUT_S or use a faster model") from exc
        except httpx.HTTPError as exc:
            raise JudgeError(f"the LLM judge at {self.url} failed ({exc}); check PREFSTREAM_REVIEW_JUDGE_URL "
                             "(the base URL, e.g. http://host:8000/v1) and the endpoint's log") from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"the LLM judge at {self.url} answered outside the chat-completions shape ({exc}); "
                             "it must be an OpenAI-compatible endpoint") from exc
        if not isinstance(out, dict) or out.get("verdict") not in ("1", "2", "tie") \
                or not isinstance(out.get("rationale"), str):
            raise JudgeError(f"the LLM judge answered outside its schema: {str(out)[:300]}; use a model that "
                             "follows response_format json_schema")
        return out["verdict"], clip(out["rationale"].strip(), RATIONALE_CHARS)

    def close(self) -> None:
        self.client.close()


class JudgeAid:
    """The judge's opinion on tasks, cached in Redis under ``key(task_id)`` and asked off the request path."""

    def __init__(self, client: JudgeClient, redis: Any, key: Callable[[str], str], wait_s: float, timeout_s: float,
                 retention_s: int) -> None:
        self.client, self.redis, self.key = client, redis, key
        self.wait_s, self.retention_s = wait_s, retention_s
        self.claim_s = math.ceil(timeout_s) + CLAIM_SLACK_S
        self.pool = ThreadPoolExecutor(JUDGE_THREADS, thread_name_prefix="judge")

    def for_task(self, task: dict[str, Any], order: str) -> dict[str, Any]:
        """The task view's ``judge`` (None or {"verdict": A | B | tie, "rationale", "model"}, in ``order``)
        and ``judge_pending`` (the judge is still being asked); asks it if nobody has yet."""
        tid = task["task_id"]
        stored = self._stored(tid)
        if stored is not None:
            return view(stored, order)
        if not self.redis.set(self.key(tid), json.dumps({"state": "pending"}), nx=True, ex=self.claim_s):
            return view(self._stored(tid), order)  # another serve claimed it a moment ago
        future = self.pool.submit(self._judge, task)
        try:
            stored = future.result(timeout=self.wait_s)
        except FutureTimeout:
            stored = {"state": "pending"}
        return view(stored, order)

    def lookup(self, tid: str, order: str) -> dict[str, Any]:
        """What ``for_task`` shows, without asking: for the page to fetch a slow judgement."""
        return view(self._stored(tid), order)

    def _stored(self, tid: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.key(tid))
        return json.loads(raw) if raw else None

    def _judge(self, task: dict[str, Any]) -> dict[str, Any]:
        """Ask the judge about ``task`` and store the answer, or a failure for FAILED_RETRY_S (never raises)."""
        pair, tid = task["pair"], task["task_id"]
        shown = list(SIDES)
        random.shuffle(shown)  # the judge's own order
        try:
            verdict, rationale = self.client.ask(pair, pair[shown[0]], pair[shown[1]])
            stored = {"state": "done", "preferred": "tie" if verdict == "tie" else shown[int(verdict) - 1],
                      "rationale": rationale, "model": self.client.model}
            ttl = self.retention_s
        except Exception as exc:  # any failure: no aid for this task for now, never an error for the annotator
            log.warning("LLM judge gave no aid for task %s: %s", tid, exc)
            stored, ttl = {"state": "failed"}, FAILED_RETRY_S
        try:
            self.redis.set(self.key(tid), json.dumps(stored), ex=ttl)
        except Exception as exc:  # Redis away: this serve still gets the answer; a later one asks again
            log.warning("could not keep the LLM judge's answer for task %s in Redis: %s", tid, exc)
        return stored

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def view(stored: dict[str, Any] | None, order: str) -> dict[str, Any]:
    """``judge`` and ``judge_pending`` of a task view, with the verdict in the annotator's A/B ``order``."""
    state = (stored or {}).get("state")
    if stored is None or state != "done":
        return {"judge": None, "judge_pending": state == "pending"}
    side = stored["preferred"]
    verdict = "tie" if side == "tie" else ("A" if (side == "chosen") == (order == "chosen_first") else "B")
    return {"judge": {"verdict": verdict, "rationale": stored["rationale"], "model": stored["model"]},
            "judge_pending": False}


def from_settings(rs: Any, redis: Any, key: Callable[[str], str]) -> JudgeAid | None:
    """The judge of ReviewSettings ``rs``, or None when PREFSTREAM_REVIEW_JUDGE_URL is unset."""
    if not rs.judge_url:
        return None
    api_key = rs.judge_api_key.get_secret_value() if rs.judge_api_key else None
    client = JudgeClient(rs.judge_url, rs.judge_model, api_key, rs.judge_timeout_s)
    return JudgeAid(client, redis, key, rs.judge_wait_s, rs.judge_timeout_s, rs.retention_s)
