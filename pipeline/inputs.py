"""Input items: JSONL lines or Python dicts, validated one by one.

An item is ``{"id": ..., "text": ...}`` or ``{"id": ..., "vector": [...]}``, with an optional
``meta`` object. A bad item becomes a `BadItem` naming its line, id and field; the good items
of the same job are kept. Items without an id get a hash of their content.

Whatever a line holds, reading it gives an `Item` or a `BadItem`, never an exception: the
limits below are what the rest of the pipeline can hold (an id fits the SQL column, a text
and a vector go through the encoder, the model and the graph), and each error names its
limit. A UTF-8 byte order mark at the start of a file is skipped.

Vectors of a job share one width: the served model's vector width when it is fixed
(``dim``, from ``MOE_VECTOR_DIM``), else the width most of the job's vectors have (ties: the
earliest), never merely the first line's. The encoder's seeded projection maps that width to
the model's ``input_dim``.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import math
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.records import BadItem, Item, stable_id

MAX_LINE_BYTES = 4 * 1024 * 1024  # a line is read whole: bounded, whatever the file holds
MAX_ID_CHARS = 255  # the SQL column item ids are recorded in (item_errors.item_id)
MAX_TEXT_CHARS = 100_000  # the encoder reads the first 256 tokens; the graph keeps the text
MAX_META_DEPTH = 32
MAX_VECTOR_VALUES = 16_384  # the projection to the model's width is (width, input_dim)
# Integers longer than this are not converted (Python refuses past 4,300 digits, and any
# integer past 39 digits overflows float32 anyway): they are kept as a `LongInteger`.
MAX_INT_DIGITS = 255
FLOAT32_MAX = float(np.finfo(np.float32).max)


class LongInteger(float):
    """An integer literal of more than `MAX_INT_DIGITS` digits, left unconverted: infinite
    as a float, and it knows how many digits it had (for the error that names it)."""

    digits: int

    def __new__(cls, literal: str) -> LongInteger:
        value = super().__new__(cls, "-inf" if literal.startswith("-") else "inf")
        value.digits = len(literal.lstrip("-"))
        return value


def _parse_int(literal: str) -> int | LongInteger:
    return int(literal) if len(literal) <= MAX_INT_DIGITS else LongInteger(literal)


def _kind(value: Any) -> str:
    """A value's JSON kind, as an error names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def string_problem(value: str, limit: int) -> str | None:
    """Why a string cannot be stored as it is (too long, a NUL, a lone surrogate), or None.

    Every SQL and graph driver encodes strings as UTF-8: a lone surrogate (``"\\ud800"`` in
    JSON) is not a Unicode scalar value and cannot be encoded, and PostgreSQL text holds no
    NUL."""
    if len(value) > limit:
        return f"longer than {limit} characters ({len(value)})"
    if "\x00" in value:
        return f"holds a NUL character (at position {value.index(chr(0))})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"holds a lone surrogate (\\u{ord(value[err.start]):04x} at position "
                f"{err.start}): not valid Unicode")
    return None


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """Meta nested deeper than `MAX_META_DEPTH`, or holding a string no store can encode.

    Iterative, and it stops at the limit: a Python dict nested 10,000 deep is refused, not
    recursed into."""
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_META_DEPTH:
                return f"nested deeper than {MAX_META_DEPTH} levels"
            children = list(value.items()) if isinstance(value, dict) else value
            for child in children:
                if isinstance(value, dict):
                    key, child = child
                    if isinstance(key, str) and (why := string_problem(key, MAX_TEXT_CHARS)):
                        return f"a key {why}"
                stack.append((child, depth + 1))
        elif isinstance(value, str) and (why := string_problem(value, MAX_TEXT_CHARS)):
            return f"a string {why}"
    return None


def _value_problem(index: int, value: Any) -> str | None:
    """Why one vector value is not a float32 number, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected numbers only (value {index} is {_kind(value)})"
    if isinstance(value, LongInteger):
        return (f"value {index} is an integer of {value.digits} digits: it overflows "
                f"float32 (at most {FLOAT32_MAX:.4g})")
    if isinstance(value, float) and not math.isfinite(value):
        return f"holds NaN or infinity (value {index})"
    try:
        with np.errstate(over="ignore"):
            finite = bool(np.isfinite(np.float32(value)))
    except OverflowError:  # an int past float64
        finite = False
    if not finite:
        shown = (f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
                 if isinstance(value, int) and value.bit_length() > 1000 else f"{value:.4g}")
        return f"value {index} ({shown}) overflows float32 (at most {FLOAT32_MAX:.4g})"
    return None


def read_vector(vector: Any) -> tuple[list[float] | None, str | None]:
    """A vector's values as floats, each finite as a float32 (what the model computes in),
    or why not. Plain lists of ints and floats take one numpy pass; anything else is looked
    at value by value, to name the first bad one."""
    if not isinstance(vector, list) or not vector:
        return None, "expected a non-empty list of numbers"
    if len(vector) > MAX_VECTOR_VALUES:
        return None, f"more than {MAX_VECTOR_VALUES} values ({len(vector)})"
    if set(map(type, vector)) <= {int, float}:
        try:
            x = np.array(vector, dtype=np.float64)
        except OverflowError:  # an int past float64: the loop below names it
            x = None
        if x is not None:
            with np.errstate(over="ignore"):
                if np.isfinite(x.astype(np.float32)).all():
                    return x.tolist(), None
    for index, value in enumerate(vector):
        if why := _value_problem(index, value):
            return None, why
    return [float(v) for v in vector], None


def _check_id(raw_id: Any) -> tuple[str | None, str | None]:
    """The item's id as a string (None: none given), or why it cannot be one."""
    if raw_id is None:
        return None, None
    if isinstance(raw_id, LongInteger):
        return None, f"longer than {MAX_ID_CHARS} characters ({raw_id.digits} digits)"
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return None, f"expected a string or an integer, got {_kind(raw_id)}"
    if isinstance(raw_id, int):
        if raw_id.bit_length() > 4 * MAX_ID_CHARS:  # str() of a huge int is slow, or refused
            return None, f"longer than {MAX_ID_CHARS} characters"
        raw_id = str(raw_id)
    return raw_id, string_problem(raw_id, MAX_ID_CHARS)


def _check(raw: Any, line: int) -> Item | BadItem:
    """One item's fields, each checked against what the pipeline can hold (the vector's
    width is the job's, checked in `validate`)."""
    if not isinstance(raw, dict):
        return BadItem(line, None, "item", f"expected a JSON object, got {_kind(raw)}")
    item_id, why = _check_id(raw.get("id"))
    if why:
        shown = raw.get("id") if isinstance(raw.get("id"), str) else item_id
        return BadItem(line, shown, "id", why)
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        return BadItem(line, item_id, "meta", "expected an object")
    if why := _meta_problem(meta):
        return BadItem(line, item_id, "meta", why)
    text, vector = raw.get("text"), raw.get("vector")
    if (text is None) == (vector is None):
        return BadItem(line, item_id, "text", "expected exactly one of 'text' or 'vector'")
    if text is not None:
        if not isinstance(text, str):
            return BadItem(line, item_id, "text", f"expected a string, got {_kind(text)}")
        if why := string_problem(text, MAX_TEXT_CHARS):
            return BadItem(line, item_id, "text", why)
        if not text.strip():
            return BadItem(line, item_id, "text", "expected non-empty text")
        return Item(item_id or stable_id("item", "text:" + text), line, text, None, meta)
    values, why = read_vector(vector)
    if why:
        return BadItem(line, item_id, "vector", why)
    return Item(item_id or stable_id("item", "vector:" + json.dumps(vector)), line, None,
                values, meta)


def job_width(items: Iterable[Item], dim: int | None = None) -> tuple[int | None, str]:
    """The vector width of a job, and where it comes from: ``dim`` (the served model's)
    when given, else the width most of its vectors have (ties: the one seen first)."""
    if dim is not None:
        return dim, "the served model's vector width, MOE_VECTOR_DIM"
    widths = Counter(len(i.vector) for i in items if i.vector is not None)
    if not widths:
        return None, ""
    return widths.most_common(1)[0][0], "the width most of this job's vectors have"


class SeenIds:
    """The ids a job has had so far, as 64-bit fingerprints in a private temporary SQLite
    database (on disk, deleted when closed; SQLite keeps a few MB of it in memory), so that
    a job's memory does not grow with its length. Ids are checked a block at a time: one
    lookup and one insert statement per block.

    Two different ids share a fingerprint with probability about n^2 / 2^65 (3e-8 for a
    million items); the later one would then be refused as a duplicate, by name, with its
    line: a loss a user sees, never a silent merge."""

    def __init__(self) -> None:
        # "": SQLite's private temporary database, a file only it can see (0600, unlinked).
        self._db = sqlite3.connect("")
        self._db.execute("CREATE TABLE seen (h INTEGER PRIMARY KEY)")

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def _print(item_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8)
                              .digest(), "little", signed=True)  # SQLite's integers are signed

    def novel(self, ids: Sequence[str]) -> np.ndarray:
        """For each id in order, whether the job has not had it before (earlier in ``ids``
        included); records them all."""
        h = np.fromiter((self._print(i) for i in ids), dtype=np.int64, count=len(ids))
        fresh = np.zeros(len(h), dtype=bool)
        uniq, first = np.unique(h, return_index=True)
        fresh[first] = True  # the first of equal ids in this block
        listed = json.dumps(uniq.tolist())
        known = np.fromiter((row[0] for row in self._db.execute(
            "SELECT h FROM seen WHERE h IN (SELECT value FROM json_each(?))", (listed,))),
            dtype=np.int64)
        fresh[first[np.isin(uniq, known)]] = False
        self._db.execute("INSERT OR IGNORE INTO seen SELECT value FROM json_each(?)", (listed,))
        return fresh


def in_job(results: Sequence[Item | BadItem], width: int | None, why: str,
           seen: SeenIds) -> list[Item | BadItem]:
    """Items checked against the rest of their job: the job's vector width (``why``: where
    the width comes from) and the ids already seen."""
    out: list[Item | BadItem] = []
    for result in results:
        if (isinstance(result, Item) and result.vector is not None
                and len(result.vector) != width):
            result = BadItem(result.line, result.id, "vector",
                             f"expected {width} values, got {len(result.vector)} ({why})")
        out.append(result)
    good = [(i, r) for i, r in enumerate(out) if isinstance(r, Item)]
    fresh = seen.novel([item.id for _, item in good])
    for (i, item), ok in zip(good, fresh, strict=True):
        if not ok:
            out[i] = BadItem(item.line, item.id, "id", "duplicate id within the job")
    return out


def validate(raws: Iterable[tuple[int, Any]], dim: int | None = None
             ) -> tuple[list[Item], list[BadItem]]:
    """Check (line, raw) pairs; ``dim`` fixes the vector width (else see `job_width`)."""
    checked = [raw if isinstance(raw, BadItem) else _check(raw, line) for line, raw in raws]
    width, why = job_width((r for r in checked if isinstance(r, Item)), dim)
    items: list[Item] = []
    bad: list[BadItem] = []
    seen = SeenIds()
    try:
        for result in in_job(checked, width, why, seen):
            if isinstance(result, BadItem):
                bad.append(result)
            else:
                items.append(result)
    finally:
        seen.close()
    return items, bad


# One decoder for every line: json.loads with a keyword builds a new one per call.
_DECODER = json.JSONDecoder(parse_int=_parse_int)


def _parse(number: int, raw_line: bytes) -> Any:
    """One line's JSON, or the `BadItem` that says why it is not JSON we can read."""
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadItem(number, None, "line", f"not UTF-8 ({err.reason})")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as err:
        return BadItem(number, None, "line", f"invalid JSON: {err.msg} (column {err.colno})")
    except RecursionError:
        return BadItem(number, None, "line", "invalid JSON: nested too deep to read (meta "
                       f"may nest {MAX_META_DEPTH} levels)")
    except ValueError as err:  # a number the parser refuses
        return BadItem(number, None, "line", f"invalid JSON: {err}")


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes | BadItem]]:
    """(line number, its bytes or a `BadItem`) for each non-blank line; a line is never held
    past `MAX_LINE_BYTES`."""
    with path.open("rb") as f:
        number = 0
        while raw_line := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw_line) > MAX_LINE_BYTES and not raw_line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip to the end of this line
                yield number, BadItem(number, None, "line",
                                      f"longer than {MAX_LINE_BYTES} bytes")
                continue
            if number == 1 and raw_line.startswith(codecs.BOM_UTF8):
                raw_line = raw_line[len(codecs.BOM_UTF8):]
            if raw_line.strip():
                yield number, raw_line


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or `BadItem`) for each non-blank line."""
    for number, raw in _raw_lines(path):
        yield number, raw if isinstance(raw, BadItem) else _parse(number, raw)


@dataclass(frozen=True)
class Survey:
    """What a first pass over a file learns, in memory bounded whatever its length: how
    many items it holds (its non-blank lines, good or bad) and its vector width."""

    items: int
    width: int | None
    why: str


def survey(path: Path, dim: int | None = None) -> Survey:
    """Count a file's items and find its vector width (`job_width`'s rule) in one pass.

    Only lines that mention ``"vector"`` are parsed, and only when ``dim`` does not fix the
    width: a file of texts is counted at the speed of reading it. Widths are counted per
    distinct width, at most `MAX_VECTOR_VALUES` of them."""
    count = 0
    widths: Counter[int] = Counter()
    for number, raw in _raw_lines(path):
        count += 1
        if dim is None and isinstance(raw, bytes) and b'"vector"' in raw:
            parsed = _parse(number, raw)
            result = parsed if isinstance(parsed, BadItem) else _check(parsed, number)
            if isinstance(result, Item) and result.vector is not None:
                widths[len(result.vector)] += 1
    if dim is not None:
        return Survey(count, dim, "the served model's vector width, MOE_VECTOR_DIM")
    if not widths:
        return Survey(count, None, "")
    return Survey(count, widths.most_common(1)[0][0],
                  "the width most of this job's vectors have")


Chunk = tuple[list[Item], list[BadItem]]
ID_BLOCK = 4096  # lines checked together for duplicate ids


def read_chunks(path: Path, found: Survey, batch_size: int) -> Iterator[Chunk]:
    """A file's items in chunks of ``batch_size`` good items, each with the bad items read
    since the previous chunk (the last chunk may hold bad items only). Memory is one chunk
    and `SeenIds`, whatever the file's length; reading the same unchanged file again gives
    the same chunks (a job resumes by chunk index)."""
    seen = SeenIds()
    items: list[Item] = []
    bad: list[BadItem] = []
    lines = _lines(path)
    try:
        # A block of lines at a time: the duplicate check is two statements per block.
        while block := [raw if isinstance(raw, BadItem) else _check(raw, line)
                        for line, raw in itertools.islice(lines, ID_BLOCK)]:
            for result in in_job(block, found.width, found.why, seen):
                if isinstance(result, BadItem):
                    bad.append(result)
                else:
                    items.append(result)
                if len(items) == batch_size:
                    yield items, bad
                    items, bad = [], []
    finally:
        seen.close()
    if items or bad:
        yield items, bad


def read_items(source: str | Path | list[dict[str, Any]], dim: int | None = None
               ) -> tuple[list[Item], list[BadItem]]:
    """Items of a JSONL file or a list of dicts, and the bad ones with their reasons."""
    if isinstance(source, list):
        return validate(enumerate(source, start=1), dim)
    return validate(_lines(Path(source)), dim)


JSONL_HINT = ('expected JSON Lines: one object per line, such as {"id": "a", "text": "..."} '
              'or {"id": "b", "vector": [0.1, 0.2]}')


def describe_bad(bad: Sequence[BadItem], limit: int = 3, total: int | None = None) -> str:
    """Why a job had no valid item, in one line: the first few bad items (line, id, field,
    the whole reason), and a hint when the file was empty or not JSON Lines at all.
    ``total``: how many were bad, when ``bad`` holds only the first few."""
    total = len(bad) if total is None else total
    if not bad:
        return "no item at all (an empty file?); " + JSONL_HINT
    shown = "; ".join(f"line {b.line}" + (f" id {_shown_id(b.item_id)}" if b.item_id else "")
                      + f": {b.field}: {b.message}" for b in bad[:limit])
    more = f" (and {total - limit} more)" if total > limit else ""
    hint = ""
    if len(bad) == total and all(b.field == "line" and b.message.startswith("invalid JSON")
                                 for b in bad):
        hint = "; no line is JSON: is this a CSV, or one JSON array? " + JSONL_HINT
    return f"{total} bad: {shown}{more}{hint}"


def _shown_id(item_id: str) -> str:
    """An id as an error line shows it: quoted and escaped, at most 60 characters."""
    return repr(item_id if len(item_id) <= 60 else item_id[:57] + "...")


def file_ids(path: str) -> list[str]:
    """The ids of a JSON Lines file of items (what `run` would have filed), in order."""
    ids = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PipelineError(f"{path}: line {n}: not JSON ({err.msg})") from None
            item_id = record.get("id") if isinstance(record, dict) else None
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise PipelineError(f"{path}: line {n}: field 'id': a string or an integer "
                                    "is needed")
            ids.append(str(item_id))
    return ids
