"""`prefstream review`: the annotator web app (FastAPI, server-rendered pages, a JSON API).

Pages: /annotate (sign in with a token, then tasks with keyboard shortcuts), /expert (escalated
tasks), /stats (signed in: a Bearer token, or the cookie the sign-in page sets for /stats). API
(Bearer token): GET /api/tasks/next, POST /api/tasks/{task_id}/verdict, GET /api/tasks/{task_id}/judge,
GET /api/stats; documented at /docs. Verdicts go to prefs.annotations.

A served task shows what helps the annotator: the model's margin in their own A/B order, the
similar pairs with the label the humans gave them (streams/review/similar.py) and, when configured,
the LLM judge's opinion (streams/review/judge.py), which is never a vote.

Guards: request bodies over ``max_body_bytes`` get 413, a token making more than ``rate_per_s``
requests in one second gets 429 with Retry-After, a client address that sent more than
``unknown_tokens_per_min`` unknown tokens gets 429 for the rest of the minute, and an annotator holding
``max_leases`` tasks gets 409 until they answer one. An annotator has one vote per task, reserved in
Redis before its Annotation is produced, so concurrent submits put one Annotation on the topic.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from confluent_kafka import Producer
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, model_validator

from schemas.records import Strength
from schemas.wire import ValueCodec
from streams.exceptions import ConfigError
from streams.kafka import topics
from streams.kafka.config import producer_config
from streams.keys import review_keys
from streams.review import audit, dashboard, metrics, tau
from streams.review import judge as judges
from streams.review.aggregator import alpha_by_category_key, consistency
from streams.review.auth import TokenBook
from streams.review.provenance import AnnotationKeys
from streams.review.queue import QueueError, ReviewQueue
from streams.review.render import markdown_html
from streams.review.similar import with_verified
from streams.settings import ReviewSettings, Settings

VERDICT_TO_PREFERRED = {"tie": "tie", "both_bad": "both_bad", "invalid": "invalid"}
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))  # autoescape is on for .html
STATS_COOKIE = "prefstream-token"  # set by the sign-in page with path=/stats: a browser cannot send Bearer headers
# Unknown tokens are counted per client address in windows of this many seconds.
UNKNOWN_TOKEN_WINDOW_S = 60
# A verdict's Annotation is delivered or has failed within VERDICT_DELIVERY_MS (the producer's
# message.timeout.ms), so a flush that waits longer knows the outcome: a failed verdict may be given
# again without a second copy reaching Kafka later.
VERDICT_DELIVERY_MS = 10_000
VERDICT_FLUSH_S = VERDICT_DELIVERY_MS / 1000 + 5
# How long a second submit of one vote waits for the first to be stored, and how often it looks.
VERDICT_WAIT_S = VERDICT_FLUSH_S + 1
VERDICT_POLL_S = 0.05
SIGN_IN_FIRST = ('<!doctype html><title>prefstream review</title><p>The stats need an annotator token: sign in at '
                 '<a href="/annotate">/annotate</a> first, or send <code>Authorization: Bearer &lt;token&gt;</code>.')


class VerdictIn(BaseModel):
    verdict: Literal["A", "B", "tie", "both_bad", "invalid"]
    strength: Strength | None = Field(None, description="How much better the response named by verdict A or B is: "
                                                        "slightly, clearly or much (only with A or B).")
    rationale: str | None = Field(None, max_length=4000)

    @model_validator(mode="after")
    def _strength_only_with_a_side(self) -> VerdictIn:
        if self.strength is not None and self.verdict not in ("A", "B"):
            raise ValueError(f"strength {self.strength!r} goes with verdict A or B; a {self.verdict} verdict ranks "
                             "neither response, so send it without a strength")
        return self


def client_address(request: Request) -> str | None:
    """The address unknown tokens are counted by: the client's, as uvicorn's proxy headers support gives it
    (X-Forwarded-For from a proxy in PREFSTREAM_REVIEW_FORWARDED_ALLOW_IPS, else the peer's address)."""
    return request.client.host if request.client else None


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
    keys: AnnotationKeys | None = None  # signs each Annotation (provenance.py); the aggregator checks it
    versions: Callable[[], list[Any]] | None = None  # the model store's versions, for the stats page's chart

    def who(self, token: str | None, client: str | None = None) -> str:
        """The annotator of ``token``, counted against their rate limit; 401 or 429 otherwise.

        Unknown tokens are counted per client address (``client``, the proxy's X-Forwarded-For where the
        proxy is trusted): past ``unknown_tokens_per_min`` in a minute, every request with a token from that
        address gets 429 until the minute ends, a right token too, so guessing learns nothing meanwhile."""
        unknown = None
        if client is not None and token:
            unknown = self.queue.k("unknown-tokens", client, str(int(time.time() // UNKNOWN_TOKEN_WINDOW_S)))
            if int(self.redis.get(unknown) or 0) >= self.rs.unknown_tokens_per_min:
                raise self._locked_out(client)
        name = self.book.who(token)
        if name is None:
            if unknown is not None:  # a token given but not known: a guess, counted for its address
                pipe = self.redis.pipeline()
                pipe.incr(unknown)
                pipe.expire(unknown, 2 * UNKNOWN_TOKEN_WINDOW_S)
                if pipe.execute()[0] > self.rs.unknown_tokens_per_min:
                    raise self._locked_out(client)
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

    def _locked_out(self, client: str | None) -> HTTPException:
        wait = UNKNOWN_TOKEN_WINDOW_S - int(time.time()) % UNKNOWN_TOKEN_WINDOW_S
        return HTTPException(429, f"more than {self.rs.unknown_tokens_per_min} unknown tokens from {client} this "
                                  f"minute; check your token and retry in {wait} s", headers={"Retry-After": str(wait)})

    def await_vote(self, tid: str, who: str) -> dict[str, Any]:
        """The answer to a submit that found another request of ``who`` giving their vote on ``tid``: that
        vote once it is stored (as a duplicate), or 409 if it is not stored within VERDICT_WAIT_S."""
        deadline = time.monotonic() + VERDICT_WAIT_S
        while time.monotonic() < deadline:
            prior = self.queue.answered(tid, who)
            if prior is not None:
                return prior | {"duplicate": True}
            time.sleep(VERDICT_POLL_S)
        raise HTTPException(409, f"another request of {who} is still storing a verdict on task {tid}; retry in a "
                                 "moment", headers={"Retry-After": "1"})

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
        by_category = self.redis.hgetall(alpha_by_category_key(self.topic_prefix))
        return self.queue.stats() | {"alpha": float(alpha) if alpha else None,
                                     "alpha_by_category": {k.decode(): float(v) for k, v in by_category.items()},
                                     "reannotation": consistency(self.redis, self.topic_prefix),
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
    def stats_page(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer),
                   minutes: int = Query(dashboard.DEFAULT_MINUTES, ge=1, le=dashboard.MAX_MINUTES,
                                        description="how many minutes the charts over time show")) -> Any:
        try:
            ctx.who(creds.credentials if creds else request.cookies.get(STATS_COOKIE), client_address(request))
        except HTTPException as exc:
            if exc.status_code != 401:
                raise
            return HTMLResponse(SIGN_IN_FIRST, status_code=401)  # a page for people: say how to sign in
        s = ctx.stats()
        alpha = f"{s['alpha']:.4f}" if s["alpha"] is not None else "n/a"
        charts = dashboard.charts(ctx.redis, ctx.topic_prefix, s, ctx.versions, minutes)
        return TEMPLATES.TemplateResponse(request, "stats.html", {"s": s, "alpha": alpha, "charts": charts,
                                                                  "minutes": minutes})

    @router.get("/api/stats")
    def api_stats(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict[str, Any]:
        ctx.who(creds.credentials if creds else None, client_address(request))
        return ctx.stats()

    return router


def api_routes(ctx: Review, bearer: HTTPBearer) -> APIRouter:
    """Lease the next task, submit a verdict."""
    router = APIRouter(prefix="/api/tasks")

    def annotator(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        return ctx.who(creds.credentials if creds else None, client_address(request))

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
        # One vote per (task, annotator), reserved atomically before anything is produced: of two
        # concurrent submits only one reaches Kafka; the other waits for it and answers as its duplicate.
        # The lease is checked inside the same atomic step, never before it: the winning submit drops the
        # lease, so a separate check would answer a racing duplicate 403 instead of the vote.
        try:
            claimed = ctx.queue.claim_vote(task_id, who)
        except QueueError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if not claimed:
            return ctx.await_vote(task_id, who)
        errors: list[str] = []
        try:
            # The expert flag is the token's role here, on an expert task; the signature vouches for it.
            ann = annotation(task, who, body, ctx.order_for(task_id, who), expert=who in ctx.book.experts)
            value, headers = ctx.codec.encode("Annotation", ann, ctx.out_topic)
            assert ctx.keys is not None  # create_app always gives the app its signing keys
            headers = ctx.keys.headers(ctx.codec, value, headers, ctx.out_topic)
            ctx.producer.produce(ctx.out_topic, key=ann["pair_id"].encode(), value=value, headers=headers,
                                 on_delivery=lambda err, _m: errors.append(err.str()) if err else None)
        except BaseException:
            ctx.queue.release_vote(task_id, who)  # nothing was queued for Kafka: a retry may give the vote
            raise
        pending = ctx.producer.flush(VERDICT_FLUSH_S)
        if pending or errors:
            if not pending:  # failed for certain: a retry may give the vote; else the claim lapses by itself
                ctx.queue.release_vote(task_id, who)
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
        counts = ctx.stats()
        for state in ("pending", "expert"):
            metrics.QUEUE_TASKS.labels(state).set(counts[state])
        for (category, kind), count in audit.read(ctx.redis, ctx.topic_prefix).items():
            metrics.AUDITED.labels(kind, category).set(count.decided)
            if count.precision is not None:
                metrics.AUDIT_PRECISION.labels(kind, category).set(count.precision)
        # From Redis, not only from the aggregator's last decision: a restarted app reports them at once.
        for category, a in counts["alpha_by_category"].items():
            metrics.ALPHA.labels(category).set(a)
        if counts["alpha"] is not None:
            metrics.ALPHA.labels("overall").set(counts["alpha"])
        if counts["reannotation"]["agreement"] is not None:
            metrics.REANNOTATION_AGREEMENT.set(counts["reannotation"]["agreement"])
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def task_view(task: dict[str, Any], who: str, order: str, lease_s: int) -> dict[str, Any]:
    """What the annotator sees: both responses as A and B in ``order``, and the pair's context.

    ``margin`` is reward(A) - reward(B) and ``p`` the model's probability that A is better, so both
    read in the annotator's order (the task keeps them as chosen minus rejected, p of chosen). An audit
    task shows neither: they would tell the annotator what the automatic label chose. ``A_html`` and
    ``B_html`` are the responses' markdown rendered and sanitised (render.py) for the page."""
    pair = task["pair"]
    chosen_first = order == "chosen_first"
    a, b = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
    margin, p = (task["margin"], task["p"]) if chosen_first else (-task["margin"], 1 - task["p"])
    if audit.kind_of(task) is not None:
        margin = p = None
    return {
        "task_id": task["task_id"], "annotator": who, "A": a, "B": b, "A_html": markdown_html(a),
        "B_html": markdown_html(b), "conversation": pair["conversation"],
        "task_category": pair.get("task_category"), "objectivity": pair.get("objectivity"),
        "controversiality": pair.get("controversiality"), "expected_attributes": pair.get("expected_attributes"),
        "annotation_guideline": pair.get("annotation_guideline"), "margin": margin, "p": p,
        "similar": task.get("similar", []), "expert": bool(task.get("expert")), "lease_seconds": lease_s,
    }


def annotation(task: dict[str, Any], who: str, body: VerdictIn, order: str, expert: bool = False) -> dict[str, Any]:
    """The Annotation record of a verdict, mapped back to the pair; ``expert`` says whether ``who`` is an expert
    (their verdict on an expert task is final)."""
    pair = task["pair"]
    return {
        "annotation_id": f"{task['task_id']}:{who}", "task_id": task["task_id"], "pair_id": pair["pair_id"],
        "annotator": who, "verdict": body.verdict, "order": order, "preferred": preferred(body.verdict, order),
        "strength": body.strength, "rationale": body.rationale, "expert": bool(task.get("expert")) and expert,
        "reannotation": task.get("reason") == "reannotation", "task_category": pair.get("task_category"),
        "created_at": int(time.time() * 1000),
    }


def _versions(settings: Settings) -> list[Any]:
    """The model store's versions for the stats page; a models directory this process cannot see is an error
    (a store that merely looks empty would chart as 'no version published')."""
    if not settings.models_url and not Path(settings.models_dir).is_dir():
        raise ConfigError(f"no models directory at {settings.models_dir} here: no version is published yet, or "
                          "this process does not see the store (mount the models volume, or set PREFSTREAM_MODELS_URL)")
    return settings.model_store().list()


def create_app(settings: Settings, rsettings: ReviewSettings, redis_client: Any = None, producer: Any = None) -> FastAPI:
    r = redis_client or redis.Redis.from_url(settings.redis_url)
    queue = ReviewQueue(r, settings.topic_prefix, rsettings.lease_s, rsettings.max_leases, rsettings.lease_scan,
                        rsettings.retention_s)
    judge = judges.from_settings(rsettings, r, lambda tid: queue.k("judge", tid))
    ctx = Review(rsettings, TokenBook(rsettings.tokens.get_secret_value(), rsettings.experts), r, queue,
                 ValueCodec(settings.schema_registry_url), settings.topic(topics.ANNOTATIONS),
                 producer or Producer(producer_config(settings, **{"message.timeout.ms": VERDICT_DELIVERY_MS})),
                 settings.topic_prefix, judge,
                 AnnotationKeys(review_keys(settings, rsettings)), lambda: _versions(settings))
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
