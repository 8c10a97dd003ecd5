"""Per-item isolation: one item that breaks a step fails that item, not its batch.

A step (encode, route, curate) runs on the whole batch first: that is the normal path, and it
costs nothing more than the step. Only when the step raises one of the ``faults`` it is given
is each item tried alone, to find the ones that break it, and then the step is run once more
on the others, so its result (one tensor, one set of routing figures, one transaction) covers
exactly the items kept.

An item is blamed only when the rest of its batch works without it. When every item fails on
its own too (a batch of one included), the fault is not an item's (a missing encoder, a
broken checkpoint, a server refusing every write) and the original error is raised, to fail
the batch the usual way. A `PipelineError` is never an item's fault and always propagates;
nor is an outage (`errors.outage_errors`), which is retried, not tried once per item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pipeline.errors import PipelineError, outage_errors

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Isolated(Generic[T, R]):
    """A step's result on the items ``kept``, and the items that broke it, with the error."""

    result: R
    kept: list[T]
    failed: list[tuple[T, BaseException]] = field(default_factory=list)


def isolate(work: Callable[[list[T]], R], items: Sequence[T],
            faults: tuple[type[BaseException], ...] = (Exception,)) -> Isolated[T, R]:
    """``work(items)``; if that raises one of ``faults``, the items that raise it alone are
    set aside and ``work`` runs on the rest (see the module docstring)."""
    items = list(items)
    fatal: tuple[type[BaseException], ...] = (PipelineError, *outage_errors())
    try:
        return Isolated(work(items), items)
    except fatal:
        raise
    except faults as err:
        if len(items) < 2:
            raise
        failed: list[tuple[T, BaseException]] = []
        kept: list[T] = []
        for item in items:
            try:
                work([item])
            except fatal:
                raise
            except faults as one:
                failed.append((item, one))
            else:
                kept.append(item)
        if not kept:
            raise err
        return Isolated(work(kept), kept, failed)


def describe(err: BaseException) -> str:
    """An error as an item's error record gives it: its type and message."""
    return f"{type(err).__name__}: {err}"
