"""What a processor is: one batch stage of the worker, in a file of this package.

A stage takes the items still alive in a micro-batch and returns one result per item (a list as long
as its input); the pipeline (streams/runtime/pipeline.py) runs the stages of ``Pipeline.stages`` in
order, isolates each record (a record that breaks a stage goes to prefs.dlq alone,
streams/runtime/isolation.py) and hands each result to the stage's ``keep``. Adding a stage is a
file here with a ``Stage`` subclass and one line in that list. Its result is stored on the item:
the built-in stages set the typed fields of ``Item`` (``score``, ``vec``, ``verdict``); another
stage's result is kept under its class and read with ``item.found(ThatStage)``, typed by the
stage's result type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

R = TypeVar("R")


@dataclass(eq=False)
class Item:
    """One record on its way through the worker's stages, with what each stage found."""

    msg: Any
    pair: dict
    score: dict | None = None  # ScoreStage
    vec: Any = None  # EmbedStage: the prompt's unit embedding (retrieval)
    verdict: tuple[str, str] | None = None  # VerifyStage: (verifier, winner) when a tool decided the pair
    other: dict[type, Any] = field(default_factory=dict)  # results of further stages, by stage class

    @property
    def scored(self) -> dict:
        """``score``, for the code after ScoreStage: every item still alive there has one."""
        if self.score is None:
            raise LookupError(f"pair {self.pair.get('pair_id')!r} has no score: ScoreStage did not run on it")
        return self.score

    def found(self, stage: type[Stage[R]]) -> R:
        """The result ``stage`` stored for this item (KeyError when it did not run on it)."""
        return self.other[stage]


class Stage(ABC, Generic[R]):
    """One batch stage. ``name`` is the stage a dead-letter record names; ``timer`` the
    ``prefstream_stage_seconds`` label its time is counted under; ``second_look`` whether it also runs
    on deferred pairs scored again (streams/runtime/deferred.py: they were labelled and verified the
    first time)."""

    name: ClassVar[str]
    timer: ClassVar[str]
    second_look: ClassVar[bool] = False

    @abstractmethod
    def run(self, items: list[Item]) -> Sequence[R]:
        """One result per item, in order; raising fails the batch, which is then bisected to the record."""

    def keep(self, item: Item, result: R) -> None:
        item.other[type(self)] = result
