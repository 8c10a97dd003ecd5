"""Numeric option types with both ends bounded, so that every number a user types is checked
at the command line, in one line that names the option, before any work starts.

Click's own `IntRange` and `FloatRange` leave two holes: without a maximum, ``10**30`` passes
(and becomes a tensor size, a loop count or a timer), and a float range lets ``nan`` through
(every comparison with NaN is false, so ``nan < min`` never fires) and ``inf`` where there is
no maximum. These types close them; `tests/test_cli_boundary.py` walks the command tree and
fails on any numeric option declared without one of them.
"""

from __future__ import annotations

import math

import click

from pipeline.settings import WEEK_S


class Count(click.IntRange):
    """An integer in ``[min, max]``, both given: a count, a size or an index."""

    name = "integer"

    def __init__(self, min: int, max: int) -> None:  # click's own names
        super().__init__(min=min, max=max)


class Real(click.FloatRange):
    """A finite float in ``[min, max]`` (``min_open``: above ``min``); NaN and ±inf refused."""

    name = "float"

    def __init__(self, min: float, max: float, min_open: bool = False) -> None:
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(self, value, param, ctx):  # click's signature
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def seconds(max_s: float = WEEK_S) -> Real:
    """A wait in seconds: above zero (a zero wait ends before any answer), at most ``max_s``."""
    return Real(0.0, max_s, min_open=True)


BOUNDED_TYPES = (Count, Real)
