"""Commands over the insight graph: ``query``, ``similar``, ``up``, ``down``."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import click

from pipeline.cli.bounds import Count, Real, seconds
from pipeline.cli.progress import note_server_start
from pipeline.cli.text import printable
from pipeline.errors import PipelineError
from pipeline.redact import masked
from pipeline.settings import Settings


def _printable(value: object) -> object:
    """A query's value as a person reads it: an embedding (float16 bytes, the only bytes the
    graph holds) as ``<float16[D]>``, not a screen of escapes."""
    if isinstance(value, bytes | bytearray):
        return f"<float16[{len(value) // 2}]>"
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


# How deep a --param value may nest lists and maps: deeper, Python's JSON parser recurses
# until it fails with a traceback, and no query needs it.
MAX_PARAM_DEPTH = 32
# Bolt carries 64-bit integers; a longer one fails in the driver (or, past 4,300 digits, in
# Python's own int parsing) with a traceback instead of a line naming the parameter.
INT64 = (-(2**63), 2**63 - 1)


def _depth(raw: str) -> int:
    """How deep brackets nest in ``raw``, outside JSON strings (one pass, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _param(key: str, raw: str) -> object:
    """One --param value: JSON (numbers, lists, maps, true/false, quoted strings), else the
    text itself; bounded in depth and integer size, with a line naming the key otherwise."""
    def fail(why: str) -> click.BadParameter:
        return click.BadParameter(f"{key}: {why}", param_hint="--param")

    if _depth(raw) > MAX_PARAM_DEPTH:
        raise fail(f"nested deeper than {MAX_PARAM_DEPTH} lists or maps")

    def int64(digits: str) -> int:
        if len(digits.lstrip("-")) > 19 or not INT64[0] <= int(digits) <= INT64[1]:
            raise fail(f"integer {digits[:20]}{'...' if len(digits) > 20 else ''} is outside "
                       "the 64-bit range the graph server takes")
        return int(digits)

    try:
        return json.loads(raw, parse_int=int64)
    except json.JSONDecodeError:
        return raw  # a bare string


def _params(values: tuple[str, ...]) -> dict[str, object]:
    params: dict[str, object] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="--param")
        params[key] = _param(key, raw)
    return params


# A query prints this many rows, or this much text, unless told otherwise: a query that
# matches the whole graph (or UNWINDs a range) must end on its own, in bounded memory, with
# a line saying what was left out, rather than fill the terminal or the machine.
DEFAULT_ROWS = 1000
MAX_BYTES = 4 * 2**20


def _cap(rows: Iterator[dict], limit: int | None) -> Iterator[dict]:
    """The rows, ended at ``limit`` rows or `MAX_BYTES` of their text (None: every row),
    with one line on stderr naming the limit that ended them."""
    used = 0
    for n, row in enumerate(rows):
        if limit is not None and (n >= limit or used >= MAX_BYTES):
            why = (f"{limit:,} rows (--limit)" if n >= limit
                   else f"{MAX_BYTES // 2**20} MiB of output ({n:,} rows)")
            click.echo(f"stopped at {why}; --all for everything", err=True)
            return
        row = {k: _printable(v) for k, v in row.items()}
        used += len(json.dumps(row, default=str))
        yield row


def _table(rows: Iterator[dict]) -> None:
    """Rows as aligned columns; widths are set by the first `DEFAULT_ROWS` rows (with --all,
    later rows are printed as they come, wider cells pushing their line out)."""
    first = list(itertools.islice(rows, DEFAULT_ROWS))
    if not first:
        click.echo("(no rows)")
        return
    columns = list(first[0])

    def cells(row: dict) -> list[str]:
        return [printable(row.get(c, "")) for c in columns]

    head = [cells(r) for r in first]
    widths = [max(len(printable(c)), *(len(r[i]) for r in head)) for i, c in enumerate(columns)]
    click.echo("  ".join(printable(c).ljust(w) for c, w in zip(columns, widths, strict=True))
               .rstrip())
    for r in itertools.chain(head, map(cells, rows)):
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


@click.command()
@click.argument("cypher")
@click.option("--param", "params", multiple=True, help="key=value (JSON values allowed)")
@click.option("--json", "as_json", is_flag=True, help="print JSON lines instead of a table")
@click.option("--write", is_flag=True, help="allow the query to change the graph")
@click.option("--limit", type=Count(1, 10**9), default=DEFAULT_ROWS, show_default=True,
              help=f"print at most this many rows (and at most {MAX_BYTES // 2**20} MiB)")
@click.option("--all", "every_row", is_flag=True, help="print every row, however many")
@click.pass_obj
def query(settings: Settings, cypher: str, params: tuple[str, ...], as_json: bool,
          write: bool, limit: int, every_row: bool) -> None:
    """Run Cypher against the insight graph (read-only unless --write)."""
    from pipeline.storage.connect import open_graph

    values = _params(params)
    cap = None if every_row else limit
    note_server_start(settings)
    with (open_graph(settings) as graph,
          graph.stream_cypher(cypher, values, write=write,
                              write_rows=None if cap is None else cap + 1) as found):
        rows = _cap(found, cap)
        if as_json:
            for row in rows:
                click.echo(json.dumps(row, default=str))
        else:
            _table(rows)


def _vector_file(path: str) -> list[float]:
    from pipeline.inputs import read_items

    data = _npy_vector(path) if path.endswith(".npy") else _json_vector(path)

    items, bad = read_items([{"id": "query", "vector": data}])  # the items' own checks
    if bad:
        raise PipelineError(f"{path}: {bad[0].field}: {bad[0].message}")
    vector = items[0].vector
    assert vector is not None  # given as a vector, it was checked as one
    return list(vector)


def _npy_vector(path: str) -> list[float]:
    """A .npy file's numbers, its header checked before any data is read: pickles refused
    (they run code), real numbers only, at most `inputs.MAX_VECTOR_VALUES` of them."""
    import numpy as np

    from pipeline.inputs import MAX_VECTOR_VALUES

    try:  # numpy refuses a header over 10,000 bytes, and a pickle without allow_pickle
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise PipelineError(f"{path}: not a readable .npy vector ({err})") from err
    if not isinstance(array, np.ndarray):
        raise PipelineError(f"{path}: an .npz archive, not a .npy vector")
    if array.dtype.kind not in "fiu":
        raise PipelineError(f"{path}: dtype {array.dtype}: expected real numbers "
                            "(float or int)")
    if array.size > MAX_VECTOR_VALUES:
        raise PipelineError(f"{path}: shape {array.shape}: at most {MAX_VECTOR_VALUES} "
                            "values")
    return [float(v) for v in np.asarray(array).reshape(-1)]


def _json_vector(path: str) -> list:
    # 16,384 numbers as JSON take well under 1 MB: a larger file is not one vector.
    limit = 4 << 20
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:
            raise PipelineError(f"{path}: over {limit >> 20} MiB: not one vector")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # JSON and UTF-8 errors included
        raise PipelineError(f"{path}: not a readable vector file ({err})") from err
    if isinstance(data, dict):
        data = data.get("vector")
    if not isinstance(data, list) or not data or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in data):
        raise PipelineError(f"{path}: expected a non-empty JSON list of numbers, or "
                            f"{{\"vector\": [...]}}")
    return data


@click.command()
@click.option("--text", help="find insights near this text")
@click.option("--vector-file", type=click.Path(exists=True, dir_okay=False),
              help="...or near this vector (JSON list, {\"vector\": [...]}, or .npy)")
@click.option("--id", "like", metavar="ID",
              help="...or more like this stored insight (its embedding) or source (its text)")
@click.option("--k", default=10, show_default=True, type=Count(1, 1000))
@click.option("--constellation", metavar="NAME",
              help="search this constellation only [default: every one]")
@click.option("--min-score", type=Real(-1.0, 1.0),
              help="answer nothing below this cosine [default: MOE_SIMILAR_FLOOR, 0.3]")
@click.option("--json", "as_json", is_flag=True, help="print JSON lines")
@click.option("--queue/--local", "via_queue", default=None,
              help="ask a query worker, or answer here [default: the queue when "
                   "CELERY_BROKER_URL is set]")
@click.option("--timeout", type=seconds(), default=60.0, show_default=True,
              help="seconds to wait for a query worker")
@click.pass_obj
def similar(settings: Settings, text: str | None, vector_file: str | None, like: str | None,
            k: int, constellation: str | None, min_score: float | None, as_json: bool,
            via_queue: bool | None, timeout: float) -> None:
    """Insights most similar to a text, a vector or a stored item, over every constellation."""
    from pipeline.stages import SimilarAnswer

    if sum(v is not None for v in (text, vector_file, like)) != 1:
        raise click.UsageError("give exactly one of --text, --vector-file or --id")
    vector = _vector_file(vector_file) if vector_file else None
    asked = via_queue
    via_queue = bool(settings.celery_broker_url) if via_queue is None else via_queue
    if via_queue:
        from pipeline.queue.app import SIMILAR, ask
        from pipeline.queue.messages import similar_message
        from pipeline.records import Question

        message = similar_message(Question(text, vector, k, constellation, min_score, like))
        answer = SimilarAnswer.from_message(ask(settings, SIMILAR, message, timeout))
    else:
        from pipeline import stages
        from pipeline.runtime import Runtime

        if asked is None and settings.redis_url and not settings.celery_broker_url:
            click.echo("answering here, not through a query worker (CELERY_BROKER_URL is "
                       "unset; --queue asks one on REDIS_URL)", err=True)
        note_server_start(settings)
        with Runtime.from_settings(settings) as rt:
            answer = stages.similar(rt, text, vector, k, constellation=constellation,
                                    min_score=min_score, like=like)
    if as_json:
        for hit in answer.hits:
            click.echo(json.dumps(hit, default=str))
    else:
        for hit in answer.hits:
            summary = (hit.get("summary") or ", ".join(hit.get("sources") or []))[:60]
            click.echo(f"{hit['similarity']:.3f}  {printable(hit['shard']):<14} "
                       f"{printable(hit['node_id'])}  support={hit.get('support')}  "
                       f"{printable(summary)}")
    for line in _similar_notes(answer):
        click.echo(line, err=as_json)


def _similar_notes(answer: Any) -> list[str]:
    """What a reader needs beside the hits: why there are none, what was not searched."""
    notes = []
    if not answer.hits:
        where = printable(", ".join(answer.searched))
        notes.append(f"nothing close: no insight of {where} at cosine >= {answer.floor:.2f}"
                     + (f" ({answer.below_floor} below it; --min-score lowers the floor)"
                        if answer.below_floor else " (the served model's insights are none)"))
    if answer.other_models:
        notes.append(f"{answer.other_models} insight(s) of other models in these "
                     "constellations were not searched (their report space is another model's):"
                     " run their files again to re-draft them with the served model, or remove "
                     "them: moe-pipeline query --write 'MATCH (i:Insight) WHERE i.model IS NULL "
                     "OR i.model <> $current DETACH DELETE i' --param current=FINGERPRINT "
                     "(moe-pipeline models shows it)")
    return notes


@click.command()
@click.pass_obj
def up(settings: Settings) -> None:
    """Start the embedded graph server (or find the running one) and print its URI."""
    from pipeline.storage.embedded import LocalGraphServer

    if settings.neo4j_uri:
        click.echo(f"NEO4J_URI is set ({masked(settings.neo4j_uri)}): no embedded server needed")
        return
    note_server_start(settings)
    info = LocalGraphServer(settings.state_dir).start()
    click.echo(f"graph server up at {info.uri} (pid {info.pid}, "
               f"state {settings.state_dir.resolve() / 'graph'})")


@click.command()
@click.pass_obj
def down(settings: Settings) -> None:
    """Stop the embedded graph server of this state dir."""
    from pipeline.storage.embedded import LocalGraphServer

    stopped = LocalGraphServer(settings.state_dir).stop()
    click.echo("graph server stopped" if stopped else "no graph server was running")


COMMANDS = [query, similar, up, down]
