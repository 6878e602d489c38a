"""The labeler: the seed's five attributes for each pair.

- task_category: the taxonomy entry (``streams/data/taxonomy.json``, 54 task types) whose centroid
  (mean MiniLM embedding of its description and about ten examples) is nearest to the
  conversation: the last user turn, mixed with the turns before it (user and assistant) for
  multi-turn pairs.
  Top-1 accuracy on the labelled set ``bench/data/labeler_eval.jsonl`` is measured by
  ``python -m bench.labeler`` (docs/benchmarks.md).
- objectivity: the category's default, overridden by cues in the prompt ("in your opinion", ...).
- controversiality: from the two models' disagreement on the pair (|p - gold_p|), the
  category's annotator disagreement (1 - Gwet's AC1, kept in Redis by the aggregator) and the
  responses (at least medium when one refuses and the other does not).
- expected_attributes and annotation_guideline: the category's templates.

An optional LLM labeler (OpenAI-compatible endpoint, JSON-schema output) reads the whole
conversation and both responses; it is used only when configured and falls back to the default on
any failure.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from schemas.pairs import CONTROVERSIALITY, OBJECTIVITY, clip, prompt_text
from streams.exceptions import ConfigError, ProcessingError
from streams.review.disagreement import DISAGREEMENT_KEY
from streams.runtime.processors.stage import Item, Stage

log = logging.getLogger(__name__)

_OPINION_CUES = re.compile(r"\b(in your opinion|what do you think|do you believe|should i|is it (?:right|wrong|ethical)|better)\b", re.I)
# A refusal opening one response: when only one of the two refuses, the request is one people disagree on
# serving (the harmless half of HH-RLHF is made of such pairs), whatever the models' scores say.
_REFUSAL = re.compile(r"^\W*(?:i'?m sorry,? but|sorry,? but|i (?:can(?:'|no)?t|cannot|won'?t|will not|am not able to|'m not "
                      r"able to|am unable to|'m unable to) (?:help|assist|provide|do|answer|share|give|support|comply))",
                      re.I)
# A follow-up turn ("now make it shorter") says little on its own; the earlier user turns carry the
# task. The last turn keeps the larger share so that a change of subject in it still decides.
LAST_TURN_WEIGHT = 0.6
# The earlier turns are embedded as one text, most recent first, cut to about 20 tokens. With the
# assistant's turns in it the text is nearly always that long: at 200 characters labeling HH-RLHF
# pairs (70% multi-turn) took 2.6x the time of the last turn alone, at 80 characters 1.9x, at the same
# top-1 on the labelled set's dev split (bench/labeler.py; the latest turns carry the task).
CONTEXT_CHARS = 80
LLM_TURN_CHARS = 2000  # per turn and response sent to the LLM labeler: its context holds a long conversation


@dataclass(frozen=True)
class Category:
    name: str
    description: str
    examples: list[str]
    objectivity: str
    expected_attributes: list[str]
    annotation_guideline: str


def load_taxonomy(path: str | None = None) -> list[Category]:
    text = open(path).read() if path else resources.files("streams").joinpath("data/taxonomy.json").read_text()
    cats = [Category(**c) for c in json.loads(text)["categories"]]
    for c in cats:
        if c.objectivity not in OBJECTIVITY:
            raise ConfigError(f"taxonomy category {c.name}: objectivity {c.objectivity!r} is not one of {OBJECTIVITY}; "
                              "fix the taxonomy file")
    return cats


def earlier_turns(record: dict) -> str:
    """Every turn before the last user turn (the assistant's included: an answer often names the task the
    follow-up refers to), most recent first, cut to CONTEXT_CHARS ("" for one turn)."""
    conv = record["conversation"]
    last = max((i for i, t in enumerate(conv) if t["role"] == "user"), default=len(conv) - 1)
    return "\n".join(t["content"] for t in reversed(conv[:last]))[:CONTEXT_CHARS]


def refuses(response: str) -> bool:
    return bool(_REFUSAL.match(response))


def controversiality(model_disagreement: float | None, category_disagreement: float, one_refuses: bool = False) -> str:
    """low / medium / high from the larger of the two disagreement signals (both in [0, 1]); at least medium
    when exactly one of the two responses refuses."""
    score = max(model_disagreement or 0.0, category_disagreement, 0.2 if one_refuses else 0.0)
    return CONTROVERSIALITY[0] if score < 0.2 else CONTROVERSIALITY[1] if score < 0.45 else CONTROVERSIALITY[2]


class Labeler:
    def __init__(self, embedder: Any, taxonomy: list[Category] | None = None, redis: Any = None) -> None:
        self.embedder = embedder
        self.taxonomy = taxonomy or load_taxonomy()
        self.by_name = {c.name: c for c in self.taxonomy}
        self.redis = redis
        # One centroid per category: mean of the description and examples, unit length. With about
        # ten varied examples per category the mean beats the nearest single example and the mean of
        # the top three (bench/labeler.py measures them on the labelled set).
        vecs = []
        for c in self.taxonomy:
            e = embedder.embed([c.description, *c.examples])
            v = e.mean(axis=0)
            vecs.append(v / np.linalg.norm(v))
        self.centroids = np.stack(vecs)

    def category_disagreement(self) -> dict[str, float]:
        if self.redis is None:
            return {}
        try:
            raw = self.redis.hgetall(DISAGREEMENT_KEY)
        except Exception:  # Redis down: label without history rather than stall the stream
            return {}
        return {k.decode(): float(v) for k, v in raw.items()}

    def categorize(self, prompts: Sequence[str], contexts: Sequence[str] | None = None) -> list[str]:
        """Nearest category per prompt; a non-empty context (``earlier_turns``) takes 1 - LAST_TURN_WEIGHT."""
        multi = [i for i, c in enumerate(contexts or ()) if c]
        # One call for both, so the embedder batches them together by length.
        vecs = self.embedder.embed([*prompts, *(contexts[i] for i in multi)]) if contexts else self.embedder.embed(list(prompts))
        sims = vecs[:len(prompts)] @ self.centroids.T
        if multi:
            sims[multi] = LAST_TURN_WEIGHT * sims[multi] + (1 - LAST_TURN_WEIGHT) * (vecs[len(prompts):] @ self.centroids.T)
        return [self.taxonomy[i].name for i in sims.argmax(axis=1)]

    def label(self, pairs: list[dict], model_disagreement: Sequence[float | None] | None = None) -> list[dict]:
        """Fill the five attributes in place where the producer did not set them; returns the pairs."""
        prompts = [prompt_text(p) for p in pairs]
        # Where the producer set the category, the prompt's own category only picks templates for an
        # unknown name: the earlier turns' extra pass is skipped.
        cats = self.categorize(prompts, ["" if p.get("task_category") else earlier_turns(p) for p in pairs])
        history = self.category_disagreement()
        for i, (p, name) in enumerate(zip(pairs, cats, strict=True)):
            cat = self.by_name.get(p.get("task_category") or name) or self.by_name[name]
            p["task_category"] = p.get("task_category") or cat.name
            if p.get("objectivity") is None:
                obj = cat.objectivity
                if obj == "factual" and _OPINION_CUES.search(prompts[i]):
                    obj = "opinion"
                p["objectivity"] = obj
            if p.get("controversiality") is None:
                md = model_disagreement[i] if model_disagreement is not None else None
                p["controversiality"] = controversiality(md, history.get(cat.name, 0.0),
                                                         refuses(p["chosen"]) != refuses(p["rejected"]))
            if p.get("expected_attributes") is None:
                p["expected_attributes"] = list(cat.expected_attributes)
            if p.get("annotation_guideline") is None:
                p["annotation_guideline"] = cat.annotation_guideline
        return pairs


LLM_SCHEMA = {
    "type": "object",
    "properties": {
        "task_category": {"type": "string"},
        "objectivity": {"type": "string", "enum": list(OBJECTIVITY)},
        "controversiality": {"type": "string", "enum": list(CONTROVERSIALITY)},
        "expected_attributes": {"type": "array", "items": {"type": "string"}},
        "annotation_guideline": {"type": "string"},
    },
    "required": ["task_category", "objectivity", "controversiality", "expected_attributes", "annotation_guideline"],
}


def llm_view(pair: dict) -> str:
    """The whole pair as the LLM labeler reads it: every turn, then the two responses (neither named the
    chosen one), each cut to LLM_TURN_CHARS."""
    turns = [f"[{t['role']}] {clip(t['content'], LLM_TURN_CHARS)}" for t in pair["conversation"]]
    return "\n\n".join([*turns, f"[response 1] {clip(pair['chosen'], LLM_TURN_CHARS)}",
                         f"[response 2] {clip(pair['rejected'], LLM_TURN_CHARS)}"])


class LLMLabeler:
    """Attributes from an OpenAI-compatible chat endpoint (vLLM, Ollama); falls back to ``fallback``."""

    def __init__(self, base_url: str, model: str, fallback: Labeler, api_key: str | None = None, timeout: float = 10.0) -> None:
        import httpx

        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                   headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.model = model
        self.fallback = fallback
        self.failures = 0

    def _ask(self, pair: dict) -> dict:
        names = ", ".join(c.name for c in self.fallback.taxonomy)
        body = {
            "model": self.model, "temperature": 0,
            "messages": [
                {"role": "system", "content": "Label the task of this conversation: every turn counts, and the two "
                                              "candidate responses may show how objective or controversial it is. "
                                              f"task_category must be one of: {names}."},
                {"role": "user", "content": llm_view(pair)},
            ],
            "response_format": {"type": "json_schema", "json_schema": {"name": "attributes", "schema": LLM_SCHEMA}},
        }
        resp = self.client.post("/chat/completions", json=body)
        resp.raise_for_status()
        out = json.loads(resp.json()["choices"][0]["message"]["content"])
        if out.get("task_category") not in self.fallback.by_name or out.get("objectivity") not in OBJECTIVITY \
                or out.get("controversiality") not in CONTROVERSIALITY:
            raise ProcessingError(f"LLM answer outside the schema: {str(out)[:300]}", "llm_answer_invalid", "label")
        return out

    def label(self, pairs: list[dict], model_disagreement: Sequence[float | None] | None = None) -> list[dict]:
        todo = []
        for p in pairs:
            try:
                for k, v in self._ask(p).items():
                    if p.get(k) is None:
                        p[k] = v
            except Exception as exc:  # any failure: the default labeler decides
                self.failures += 1
                log.warning("LLM labeler failed (%s); using the default labeler", exc)
                todo.append(p)
        if todo:
            self.fallback.label(todo)
        return pairs


class LabelStage(Stage[dict]):
    """The five attributes, filled in each pair in place; the models' disagreement (from ScoreStage) feeds
    controversiality, so this stage runs after it."""

    name = timer = "label"

    def __init__(self, labeler: Labeler | LLMLabeler) -> None:
        self.labeler = labeler

    def run(self, items: list[Item]) -> list[dict]:
        disagreement = [abs(i.score["p"] - i.score["gold_p"]) if i.score and i.score["gold_p"] is not None else None
                        for i in items]
        return self.labeler.label([i.pair for i in items], disagreement)

    def keep(self, item: Item, result: dict) -> None:
        pass  # the labels are in the pair
