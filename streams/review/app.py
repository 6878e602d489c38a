"""`prefstream review`: the annotator web app (FastAPI, server-rendered pages, a JSON API).

Pages: /annotate (sign in with a token, then tasks with keyboard shortcuts), /expert (escalated
tasks), /stats (signed in: a Bearer token, or the cookie the sign-in page sets for /stats). API
(Bearer token): GET /api/tasks/next, POST /api/tasks/{task_id}/verdict, GET /api/tasks/{task_id}/judge,
GET /api/stats; documented at /docs. Verdicts go to prefs.annotations.

A served task shows what helps the annotator: the model's margin in their own A/B order, the
similar pairs with the label the humans gave them (streams/review/similar.py) and, when configured,
the LLM judge's opinion (streams/review/judge.py), which is never a vote.

Guards: request bodies over ``max_body_bytes`` get 413, a token making more than ``rate_per_s``
requests in one second gets 429 with Retry-After, and an annotator holding ``max_leases`` tasks gets
409 until they answer one.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from confluent_kafka import Producer
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.config import producer_config
from streams.review import audit
from streams.review import judge as judges
from streams.review.auth import TokenBook
from streams.review.queue import QueueError, ReviewQueue
from streams.review.similar import with_verified
from streams.runtime import metrics, tau
from streams.settings import ReviewSettings, Settings

VERDICT_TO_PREFERRED = {"tie": "tie", "both_bad": "both_bad", "invalid": "invalid"}
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))  # autoescape is on for .html
STATS_COOKIE = "prefstream-token"  # set by the sign-in page with path=/stats: a browser cannot send Bearer headers
SIGN_IN_FIRST = ('<!doctype html><title>prefstream review</title><p>The stats need an annotator token: sign in at '
                 '<a href="/annotate">/annotate</a> first, or send <code>Authorization: Bearer &lt;token&gt;</code>.')


class VerdictIn(BaseModel):
    verdict: Literal["A", "B", "tie", "both_bad", "invalid"]
    rationale: str | None = Field(None, max_length=4000)


def preferred(verdict: str, order: str) -> str:
    """Map what the annotator saw (A/B) back to the pair (chosen/rejected)."""
    if verdict in VERDICT_TO_PREFERRED:
        return VERDICT_TO_PREFERRED[verdict]
    a_is_chosen = order == "chosen_first"
    return "chosen" if (verdict == "A") == a_is_chosen else "rejected"


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by Content-Length or by counting a chunked one."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self) -> JSONResponse:
        return JSONResponse({"detail": f"request body over {self.limit} bytes; send a shorter one"}, status_code=413)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large()(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # raised inside the route's body read; FastAPI answers it as is
                raise HTTPException(413, f"request body over {self.limit} bytes; send a shorter one")
            return message

        await self.app(scope, counted, send)


@dataclass
class Review:
    """What the routes share: tokens, Redis, the queue, the Kafka producer of verdicts, the optional judge."""

    rs: ReviewSettings
    book: TokenBook
    redis: Any
    queue: ReviewQueue
    codec: ValueCodec
    out_topic: str
    producer: Any
    topic_prefix: str  # of the aggregator's keys, read for the similar pairs' labels
    judge: judges.JudgeAid | None = None

    def who(self, token: str | None) -> str:
        """The annotator of ``token``, counted against their rate limit; 401 or 429 otherwise."""
        name = self.book.who(token)
        if name is None:
            raise HTTPException(401, "a valid annotator token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        # A fixed one-second window in Redis, shared by every replica of the app.
        key = self.queue.k("rate", name, str(int(time.time())))
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 2)
        if pipe.execute()[0] > self.rs.rate_per_s:
            raise HTTPException(429, f"more than {self.rs.rate_per_s} requests per second from {name}; "
                                     "slow down and retry after the second", headers={"Retry-After": "1"})
        return name

    def order_for(self, tid: str, who: str) -> str:
        key = self.queue.k("order", tid, who)
        existing = self.redis.get(key)
        if existing:
            return existing.decode()
        order = random.choice(["chosen_first", "rejected_first"])  # randomised A/B, recorded with the verdict
        self.redis.set(key, order, nx=True, ex=self.rs.retention_s)  # kept as long as the task's keys
        return self.redis.get(key).decode()

    def serve(self, task: dict[str, Any], who: str) -> dict[str, Any]:
        """The task as ``who`` sees it, with its aids: the similar pairs' labels and the judge's opinion."""
        order = self.order_for(task["task_id"], who)
        view = task_view(task, who, order, self.rs.lease_s)
        view["similar"] = with_verified(self.redis, self.topic_prefix, view["similar"])
        return view | (self.judge.for_task(task, order) if self.judge else judges.view(None, order))

    def stats(self) -> dict[str, Any]:
        alpha = self.redis.get(self.queue.k("alpha", "overall"))
        return self.queue.stats() | {"alpha": float(alpha) if alpha else None,
                                     "audits": audit.summary(audit.read(self.redis, self.topic_prefix)),
                                     "tau_shift": tau.read_shifts(self.redis, self.topic_prefix)}


def page_routes() -> APIRouter:
    """The annotator and expert pages (static; they sign in and call the API from the browser)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/", response_class=HTMLResponse)
    @router.get("/annotate", response_class=HTMLResponse)
    def annotate_page(request: Request) -> Any:
        return TEMPLATES.TemplateResponse(request, "annotate.html", {"expert": False})

    @router.get("/expert", response_class=HTMLResponse)
    def expert_page(request: Request) -> Any:
        return TEMPLATES.TemplateResponse(request, "annotate.html", {"expert": True})

    return router


def stats_routes(ctx: Review, bearer: HTTPBearer) -> APIRouter:
    """/stats (page) and /api/stats (JSON): both for signed-in annotators only."""
    router = APIRouter()

    @router.get("/stats", response_class=HTMLResponse, include_in_schema=False)
    def stats_page(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Any:
        try:
            ctx.who(creds.credentials if creds else request.cookies.get(STATS_COOKIE))
        except HTTPException as exc:
            if exc.status_code != 401:
                raise
            return HTMLResponse(SIGN_IN_FIRST, status_code=401)  # a page for people: say how to sign in
        s = ctx.stats()
        alpha = f"{s['alpha']:.4f}" if s["alpha"] is not None else "n/a"
        return TEMPLATES.TemplateResponse(request, "stats.html", {"s": s, "alpha": alpha})

    @router.get("/api/stats")
    def api_stats(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict[str, Any]:
        ctx.who(creds.credentials if creds else None)
        return ctx.stats()

    return router


def api_routes(ctx: Review, bearer: HTTPBearer) -> APIRouter:
    """Lease the next task, submit a verdict."""
    router = APIRouter(prefix="/api/tasks")

    def annotator(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        return ctx.who(creds.credentials if creds else None)

    @router.get("/next", responses={204: {"description": "no task for you right now"},
                                    409: {"description": "you hold too many leased tasks"}})
    def next_task(expert: bool = False, who: str = Depends(annotator)) -> Any:
        if expert and who not in ctx.book.experts:
            raise HTTPException(403, f"{who} is not an expert annotator; use /annotate")
        try:
            task = ctx.queue.lease(who, expert=expert)
        except QueueError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if task is None:
            return Response(status_code=204)
        return ctx.serve(task, who)

    @router.get("/{task_id}/judge")
    def judge_aid(task_id: str, who: str = Depends(annotator)) -> dict[str, Any]:
        """The LLM judge's opinion on a task you hold, for a page that got the task before the judge answered."""
        if ctx.queue.holder(task_id) != who:
            raise HTTPException(403, f"task {task_id} is not leased to you; ask for the next task")
        order = ctx.order_for(task_id, who)
        return ctx.judge.lookup(task_id, order) if ctx.judge else judges.view(None, order)

    @router.post("/{task_id}/verdict")
    def submit(task_id: str, body: VerdictIn, who: str = Depends(annotator)) -> dict[str, Any]:
        prior = ctx.queue.answered(task_id, who)
        if prior is not None:  # idempotent: the same verdict again, nothing new produced
            return prior | {"duplicate": True}
        task = ctx.queue.task(task_id)
        if task is None:
            raise HTTPException(404, f"no task {task_id}")
        if ctx.queue.holder(task_id) != who:
            raise HTTPException(403, f"task {task_id} is not leased to you; ask for the next task")
        ann = annotation(task, who, body, ctx.order_for(task_id, who))
        value, headers = ctx.codec.encode("Annotation", ann, ctx.out_topic)
        errors: list[str] = []
        ctx.producer.produce(ctx.out_topic, key=ann["pair_id"].encode(), value=value, headers=headers,
                             on_delivery=lambda err, _m: errors.append(err.str()) if err else None)
        if ctx.producer.flush(10) or errors:
            raise HTTPException(503, f"the verdict could not be stored in Kafka ({errors or 'timeout'}); try again")
        try:
            result = ctx.queue.submit(task_id, who, ann)
        except QueueError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return result.annotation | {"duplicate": result.duplicate, "votes": result.votes}

    return router


def metrics_routes(ctx: Review) -> APIRouter:
    """/metrics for Prometheus: the queue's size and the aggregator's alpha (the NetworkPolicy admits
    scrapes from the monitoring namespace only; no annotator data is in it)."""
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        counts = ctx.queue.stats()
        for state in ("pending", "expert"):
            metrics.QUEUE_TASKS.labels(state).set(counts[state])
        for (category, kind), count in audit.read(ctx.redis, ctx.topic_prefix).items():
            metrics.AUDITED.labels(kind, category).set(count.decided)
            if count.precision is not None:
                metrics.AUDIT_PRECISION.labels(kind, category).set(count.precision)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def task_view(task: dict[str, Any], who: str, order: str, lease_s: int) -> dict[str, Any]:
    """What the annotator sees: both responses as A and B in ``order``, and the pair's context.

    ``margin`` is reward(A) - reward(B) and ``p`` the model's probability that A is better, so both
    read in the annotator's order (the task keeps them as chosen minus rejected, p of chosen). An audit
    task shows neither: they would tell the annotator what the automatic label chose."""
    pair = task["pair"]
    chosen_first = order == "chosen_first"
    a, b = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
    margin, p = (task["margin"], task["p"]) if chosen_first else (-task["margin"], 1 - task["p"])
    if audit.kind_of(task) is not None:
        margin = p = None
    return {
        "task_id": task["task_id"], "annotator": who, "A": a, "B": b, "conversation": pair["conversation"],
        "task_category": pair.get("task_category"), "objectivity": pair.get("objectivity"),
        "controversiality": pair.get("controversiality"), "expected_attributes": pair.get("expected_attributes"),
        "annotation_guideline": pair.get("annotation_guideline"), "margin": margin, "p": p,
        "similar": task.get("similar", []), "expert": bool(task.get("expert")), "lease_seconds": lease_s,
    }


def annotation(task: dict[str, Any], who: str, body: VerdictIn, order: str) -> dict[str, Any]:
    """The Annotation record of a verdict, mapped back to the pair."""
    pair = task["pair"]
    return {
        "annotation_id": f"{task['task_id']}:{who}", "task_id": task["task_id"], "pair_id": pair["pair_id"],
        "annotator": who, "verdict": body.verdict, "order": order, "preferred": preferred(body.verdict, order),
        "rationale": body.rationale, "expert": bool(task.get("expert")),
        "reannotation": task.get("reason") == "reannotation", "task_category": pair.get("task_category"),
        "created_at": int(time.time() * 1000),
    }


def create_app(settings: Settings, rsettings: ReviewSettings, redis_client: Any = None, producer: Any = None) -> FastAPI:
    r = redis_client or redis.Redis.from_url(settings.redis_url)
    queue = ReviewQueue(r, settings.topic_prefix, rsettings.lease_s, rsettings.max_leases, rsettings.lease_scan,
                        rsettings.retention_s)
    judge = judges.from_settings(rsettings, r, lambda tid: queue.k("judge", tid))
    ctx = Review(rsettings, TokenBook(rsettings.tokens.get_secret_value(), rsettings.experts), r, queue,
                 ValueCodec(settings.schema_registry_url), settings.topic(topics.ANNOTATIONS),
                 producer or Producer(producer_config(settings)), settings.topic_prefix, judge)
    bearer = HTTPBearer(auto_error=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if judge:
            judge.close()

    app = FastAPI(title="prefstream review", description="Annotator API: lease tasks, submit verdicts.",
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=rsettings.max_body_bytes)
    app.include_router(page_routes())
    app.include_router(stats_routes(ctx, bearer))
    app.include_router(api_routes(ctx, bearer))
    app.include_router(metrics_routes(ctx))
    app.state.queue = queue
    app.state.book = ctx.book
    return app
