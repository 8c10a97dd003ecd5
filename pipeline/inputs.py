"""Input items: JSONL lines or Python dicts, validated one by one.

An item is ``{"id": ..., "text": ...}`` or ``{"id": ..., "vector": [...]}``, with an optional
``meta`` object. A bad item becomes a `BadItem` naming its line, id and field; the good items
of the same job are kept. Items without an id get a hash of their content.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.records import BadItem, Item, stable_id


def _check(raw: Any, line: int, dim: int | None) -> Item | BadItem:
    if not isinstance(raw, dict):
        return BadItem(line, None, "item", f"expected a JSON object, got {type(raw).__name__}")
    item_id = raw.get("id")
    if item_id is not None and not isinstance(item_id, str | int):
        return BadItem(line, None, "id", "expected a string or an integer")
    item_id = None if item_id is None else str(item_id)
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        return BadItem(line, item_id, "meta", "expected an object")
    text, vector = raw.get("text"), raw.get("vector")
    if (text is None) == (vector is None):
        return BadItem(line, item_id, "text", "expected exactly one of 'text' or 'vector'")
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            return BadItem(line, item_id, "text", "expected non-empty text")
        content = "text:" + text
    else:
        if not isinstance(vector, list) or not vector:
            return BadItem(line, item_id, "vector", "expected a non-empty list of numbers")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vector):
            return BadItem(line, item_id, "vector", "expected numbers only")
        if not all(math.isfinite(v) for v in vector):
            return BadItem(line, item_id, "vector", "holds NaN or infinity")
        if dim is not None and len(vector) != dim:
            return BadItem(line, item_id, "vector", f"expected {dim} values, got {len(vector)}")
        content = "vector:" + json.dumps(vector)
    return Item(item_id or stable_id("item", content), line, text,
                None if vector is None else [float(v) for v in vector], meta)


def validate(raws: Iterable[tuple[int, Any]], dim: int | None = None
             ) -> tuple[list[Item], list[BadItem]]:
    """Check (line, raw) pairs; ``dim`` fixes the vector width (else the first vector's)."""
    items: list[Item] = []
    bad: list[BadItem] = []
    seen: set[str] = set()
    for line, raw in raws:
        if isinstance(raw, BadItem):
            bad.append(raw)
            continue
        result = _check(raw, line, dim)
        if isinstance(result, Item) and result.id in seen:
            result = BadItem(line, result.id, "id", "duplicate id within the job")
        if isinstance(result, BadItem):
            bad.append(result)
            continue
        if dim is None and result.vector is not None:
            dim = len(result.vector)
        seen.add(result.id)
        items.append(result)
    return items, bad


def _lines(path: Path) -> Iterable[tuple[int, Any]]:
    with path.open("rb") as f:
        for number, raw_line in enumerate(f, start=1):
            if not raw_line.strip():
                continue
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, BadItem(number, None, "line", f"not UTF-8 ({err.reason})")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                yield number, BadItem(number, None, "line",
                                      f"invalid JSON: {err.msg} (column {err.colno})")


def read_items(source: str | Path | list[dict[str, Any]], dim: int | None = None
               ) -> tuple[list[Item], list[BadItem]]:
    """Items of a JSONL file or a list of dicts, and the bad ones with their reasons."""
    if isinstance(source, list):
        return validate(enumerate(source, start=1), dim)
    return validate(_lines(Path(source)), dim)


JSONL_HINT = ('expected JSON Lines: one object per line, such as {"id": "a", "text": "..."} '
              'or {"id": "b", "vector": [0.1, 0.2]}')


def describe_bad(bad: Sequence[BadItem], limit: int = 3) -> str:
    """Why a job had no valid item, in one line: the first few bad items (line, id, field,
    the whole reason), and a hint when the file was empty or not JSON Lines at all."""
    if not bad:
        return "no item at all (an empty file?); " + JSONL_HINT
    shown = "; ".join(f"line {b.line}" + (f" id {b.item_id!r}" if b.item_id else "")
                      + f": {b.field}: {b.message}" for b in bad[:limit])
    more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
    hint = ""
    if all(b.field == "line" and b.message.startswith("invalid JSON") for b in bad):
        hint = "; no line is JSON: is this a CSV, or one JSON array? " + JSONL_HINT
    return f"{len(bad)} bad: {shown}{more}{hint}"
