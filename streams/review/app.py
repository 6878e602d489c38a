"""`prefstream review`: the annotator web app (FastAPI, server-rendered pages, a JSON API).

Pages: /annotate (sign in with a token, then tasks with keyboard shortcuts), /expert (escalated
tasks), /stats. API (Bearer token): GET /api/tasks/next, POST /api/tasks/{task_id}/verdict,
GET /api/stats; documented at /docs. Verdicts go to prefs.annotations.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal

import redis
from confluent_kafka import Producer
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.config import producer_config
from streams.review.auth import TokenBook
from streams.review.queue import QueueError, ReviewQueue
from streams.settings import ReviewSettings, Settings

VERDICT_TO_PREFERRED = {"tie": "tie", "both_bad": "both_bad", "invalid": "invalid"}
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))  # autoescape is on for .html


class VerdictIn(BaseModel):
    verdict: Literal["A", "B", "tie", "both_bad", "invalid"]
    rationale: str | None = Field(None, max_length=4000)


def preferred(verdict: str, order: str) -> str:
    """Map what the annotator saw (A/B) back to the pair (chosen/rejected)."""
    if verdict in VERDICT_TO_PREFERRED:
        return VERDICT_TO_PREFERRED[verdict]
    a_is_chosen = order == "chosen_first"
    return "chosen" if (verdict == "A") == a_is_chosen else "rejected"


def create_app(settings: Settings, rsettings: ReviewSettings, redis_client: Any = None, producer: Any = None) -> FastAPI:
    book = TokenBook(rsettings.tokens.get_secret_value(), rsettings.experts)
    r = redis_client or redis.Redis.from_url(settings.redis_url)
    queue = ReviewQueue(r, settings.topic_prefix, rsettings.lease_s)
    codec = ValueCodec(settings.schema_registry_url)
    out_topic = settings.topic(topics.ANNOTATIONS)
    prod = producer or Producer(producer_config(settings))
    bearer = HTTPBearer(auto_error=False)
    app = FastAPI(title="prefstream review", description="Annotator API: lease tasks, submit verdicts.")

    def annotator(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        name = book.who(creds.credentials if creds else None)
        if name is None:
            raise HTTPException(401, "a valid annotator token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        return name

    def order_for(tid: str, who: str) -> str:
        key = queue.k("order", tid, who)
        existing = r.get(key)
        if existing:
            return existing.decode()
        order = random.choice(["chosen_first", "rejected_first"])  # randomised A/B, recorded with the verdict
        r.set(key, order, nx=True, ex=7 * 24 * 3600)
        return r.get(key).decode()

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/annotate", response_class=HTMLResponse, include_in_schema=False)
    def annotate_page(request: Request) -> Any:
        return TEMPLATES.TemplateResponse(request, "annotate.html", {"expert": False})

    @app.get("/expert", response_class=HTMLResponse, include_in_schema=False)
    def expert_page(request: Request) -> Any:
        return TEMPLATES.TemplateResponse(request, "annotate.html", {"expert": True})

    @app.get("/stats", response_class=HTMLResponse, include_in_schema=False)
    def stats_page(request: Request) -> Any:
        alpha = r.get(queue.k("alpha", "overall"))
        return TEMPLATES.TemplateResponse(request, "stats.html", {"s": queue.stats(),
                                                                  "alpha": alpha.decode() if alpha else "n/a"})

    @app.get("/api/stats")
    def api_stats() -> dict[str, Any]:
        alpha = r.get(queue.k("alpha", "overall"))
        return queue.stats() | {"alpha": float(alpha) if alpha else None}

    @app.get("/api/tasks/next", responses={204: {"description": "no task for you right now"}})
    def next_task(expert: bool = False, who: str = Depends(annotator)) -> Any:
        if expert and who not in book.experts:
            raise HTTPException(403, f"{who} is not an expert annotator")
        task = queue.lease(who, expert=expert)
        if task is None:
            return Response(status_code=204)
        pair = task["pair"]
        order = order_for(task["task_id"], who)
        a, b = (pair["chosen"], pair["rejected"]) if order == "chosen_first" else (pair["rejected"], pair["chosen"])
        return {
            "task_id": task["task_id"], "annotator": who, "A": a, "B": b, "conversation": pair["conversation"],
            "task_category": pair.get("task_category"), "objectivity": pair.get("objectivity"),
            "controversiality": pair.get("controversiality"), "expected_attributes": pair.get("expected_attributes"),
            "annotation_guideline": pair.get("annotation_guideline"), "margin": task["margin"], "p": task["p"],
            "similar": task.get("similar", []), "expert": bool(task.get("expert")), "lease_seconds": rsettings.lease_s,
        }

    @app.post("/api/tasks/{task_id}/verdict")
    def submit(task_id: str, body: VerdictIn, who: str = Depends(annotator)) -> dict[str, Any]:
        prior = r.hget(queue.k("verdicts", task_id), who)
        if prior is not None:  # idempotent: the same verdict again, nothing new produced
            return json.loads(prior) | {"duplicate": True}
        task = queue.task(task_id)
        if task is None:
            raise HTTPException(404, f"no task {task_id}")
        if queue.holder(task_id) != who:
            raise HTTPException(403, f"task {task_id} is not leased to you; ask for the next task")
        order = order_for(task_id, who)
        pair = task["pair"]
        ann = {
            "annotation_id": f"{task_id}:{who}", "task_id": task_id, "pair_id": pair["pair_id"], "annotator": who,
            "verdict": body.verdict, "order": order, "preferred": preferred(body.verdict, order),
            "rationale": body.rationale, "expert": bool(task.get("expert")),
            "reannotation": task.get("reason") == "reannotation", "task_category": pair.get("task_category"),
            "created_at": int(time.time() * 1000),
        }
        value, headers = codec.encode("Annotation", ann, out_topic)
        errors: list[str] = []
        prod.produce(out_topic, key=pair["pair_id"].encode(), value=value, headers=headers,
                     on_delivery=lambda err, _m: errors.append(err.str()) if err else None)
        if prod.flush(10) or errors:
            raise HTTPException(503, f"the verdict could not be stored in Kafka ({errors or 'timeout'}); try again")
        try:
            result = queue.submit(task_id, who, ann)
        except QueueError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return result.annotation | {"duplicate": result.duplicate, "votes": result.votes}

    app.state.queue = queue
    app.state.book = book
    return app

