"""The insight graph over Bolt, with the official neo4j driver only.

`GraphStore` writes one transaction per curated batch (``UNWIND $rows`` + ``MERGE`` on
deterministic ids, so a replayed batch changes nothing); the librarian's reads for the batch
(reports already curated, the shards' new rows) run in that same transaction (`curate`,
`CurateTx`). It reads a shard's embeddings into a preallocated array for the hot cache, and
runs users' Cypher read-only unless a write is asked for explicitly. Writes go through the
driver's managed transactions, which retry transient errors (deadlock, leader switch,
session expiry) with backoff.

A read-only query is refused in three layers: by `cypher_guard` before it is sent (deny by
default), by the server (it runs as a user that may only read, where the store has one, and
always in a READ transaction, which Neo4j enforces), and by the query type the server
reports (EXPLAIN first where that type is true, the summary after), in a transaction that is
rolled back whatever happened.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from neo4j import Driver, GraphDatabase, ManagedTransaction, ResultSummary
from neo4j.exceptions import (
    AuthError,
    ClientError,
    ConstraintError,
    DatabaseError,
    ServiceUnavailable,
    SessionExpired,
)

from pipeline.errors import Outage, PipelineError
from pipeline.records import CuratedBatch, insight_id
from pipeline.storage import cypher, cypher_guard, rows
from pipeline.storage.cypher_guard import ReadOnlyQueryError  # callers catch it from here

# A user's read-only query ends after this long on Neo4j (the transaction timeout; the
# embedded server has its own command timeout, `embedded.COMMAND_TIMEOUT_S`).
READ_TIMEOUT_S = 120.0
# Rows a user's query pulls from the server at a time (the driver's default), made explicit.
FETCH_ROWS = 1000

T = TypeVar("T")


class GraphUnavailable(Outage):
    """The graph server cannot be reached; names the URI."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        # One line: a driver's reason can run over several.
        super().__init__(f"graph at {uri} is unavailable: {' '.join(reason.split())}")


class StaleWriteError(PipelineError):
    """A curated batch was decided against a view of its shard that is no longer true.

    Raised, with nothing written, when the shard's max seq moved since the writer caught up
    (another writer got in: an expired lock) or when an insight the batch merges into is not
    in the graph (a cache from another graph or a stale snapshot). The writer should catch
    up (or re-warm) and decide again.
    """

    def __init__(self, shard: str, reason: str) -> None:
        self.shard = shard
        super().__init__(f"shard {shard!r}: {reason}")


class QueryError(PipelineError):
    """The graph server refused a user's query: its own message, in one line."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        first = " ".join(message.split())
        if code.endswith("ParameterMissing"):
            names = [n.strip() for n in first.split(":", 1)[-1].split(",") if n.strip()]
            hint = " ".join(f"--param {n}=VALUE" for n in names)
            super().__init__(f"the query needs parameter(s) {', '.join('$' + n for n in names)}"
                             f": give {'each' if len(names) > 1 else 'it'} as {hint}")
        else:
            kind = code.rsplit(".", 1)[-1] if code else "error"
            super().__init__(f"query refused by the graph server ({kind}): {first}")


@dataclass
class ShardRows:
    """A shard's insights as arrays: what the hot cache loads."""

    ids: list[str]
    seqs: np.ndarray  # (n,) int64, ascending
    embeddings: np.ndarray  # (n, dim) float16
    summaries: list[str]
    top: int  # the shard's highest seq when read (any model's), -1 when empty
    epoch: int = 0  # the shard's forget count when read (`cypher.EPOCHS`)

    def __len__(self) -> int:
        return len(self.ids)


class GraphStore:
    """The project's graph: schema, batched writes, cache reads, user queries.

    ``driver`` does the pipeline's own reads and writes and users' ``write=True`` queries;
    ``reader``, when given, is a driver logged in as a user the server lets only read, and
    runs users' read-only queries (without one, they run on ``driver`` in READ transactions).
    """

    def __init__(self, driver: Driver, database: str | None = None, uri: str = "",
                 vector_index: bool = False, reader: Driver | None = None) -> None:
        self.driver, self.database, self.uri = driver, database, uri
        self.reader = reader
        self.dialect = cypher.Dialect.for_agent(driver.get_server_info().agent)
        self.with_vector = vector_index and self.dialect.vector_index
        self.auth: tuple[str, str | None] | None = None
        # How long a user's read-only query may run on Neo4j before the server ends it.
        self.read_timeout_s = READ_TIMEOUT_S

    @classmethod
    def connect(cls, uri: str, username: str, password: str | None,
                database: str | None = None, timeout_s: float = 30.0,
                vector_index: bool = False,
                reader: tuple[str, str] | None = None) -> GraphStore:
        """Open a driver and wait (up to ``timeout_s``) until the server answers; with
        ``reader`` (user, password), a second one for users' read-only queries."""
        driver = _open_driver(uri, (username, password or ""), timeout_s)
        try:
            reader_driver = _open_driver(uri, reader, timeout_s) if reader else None
        except GraphUnavailable:
            driver.close()
            raise
        store = cls(driver, database, uri, vector_index, reader_driver)
        store.auth = (username, password)  # for helpers that open their own driver
        return store

    def close(self) -> None:
        self.driver.close()
        if self.reader is not None:
            self.reader.close()

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, read: bool = False):
        mode = "READ" if read else "WRITE"
        return self.driver.session(database=self.database, default_access_mode=mode)

    @contextlib.contextmanager
    def _user_query(self) -> Iterator[None]:
        """A user's query that the server refuses (syntax, a missing parameter, an unknown
        variable) becomes `QueryError`: one line, the server's message."""
        try:
            yield
        except ClientError as err:  # a uniqueness violation of a user's write included
            if isinstance(err, AuthError):
                raise
            raise QueryError(err.code or "", err.message or str(err)) from err
        except DatabaseError as err:  # ArcadeDB reports an unknown function this way
            raise QueryError(err.code or "", err.message or str(err)) from err

    @contextlib.contextmanager
    def _outage(self) -> Iterator[None]:
        """Every call to the server goes through here: a lost or refused connection becomes
        `GraphUnavailable` (an outage the caller may retry), naming the server."""
        try:
            yield
        except (ServiceUnavailable, SessionExpired) as err:
            raise GraphUnavailable(self.uri, str(err) or type(err).__name__) from err
        except OSError as err:  # a socket error the driver did not wrap
            raise GraphUnavailable(self.uri, f"{type(err).__name__}: {err}") from err

    # -- schema and model ------------------------------------------------------------------
    def ensure_schema(self, vector_dim: int | None = None) -> None:
        """Constraints and indexes, created if missing (safe to call at every start)."""
        with self._outage(), self._session() as session:
            for statement in self.dialect.schema(vector_dim if self.with_vector else None):
                session.run(statement).consume()
            if self.with_vector and vector_dim is not None:
                # IF NOT EXISTS keeps an index of another width without a word, and Neo4j
                # then leaves every new embedding out of it.
                found = session.run(cypher.VECTOR_INDEX_WIDTH).data()
                width = found[0]["width"] if found else vector_dim
                if width != vector_dim:
                    raise PipelineError(
                        f"the graph's vector index insight_embedding is {width} wide and the "
                        f"served model's embeddings {vector_dim}: drop it (moe-pipeline query "
                        "--write 'DROP INDEX insight_embedding') and it is made anew")

    def ensure_run(self, run_id: str, config: dict[str, Any],
                   constellations: dict[str, list[str]], model: str | None = None) -> None:
        """The Run node and the model's experts (of ``model``) and constellations."""
        def work(tx: ManagedTransaction) -> None:
            tx.run(cypher.MERGE_RUN, id=run_id, created_at=time.time(),
                   config=json.dumps(config, sort_keys=True)).consume()
            tx.run(cypher.MERGE_MODEL, rows=rows.model_rows(constellations, model)).consume()

        self._write(work)

    # -- writes ----------------------------------------------------------------------------
    def write_batch(self, batch: CuratedBatch,
                    expect_max_seq: dict[str, int] | None = None) -> dict[str, int]:
        """Everything of one curated batch in one transaction; returns the row counts.

        Call it under the shard's lock: which insights are new is read inside the same
        transaction, and new ones are created rather than merged. ``expect_max_seq`` fences
        the write: if a shard's max seq is not what the writer saw, or an insight the batch
        only adds edges to is missing, `StaleWriteError` is raised and nothing is written.
        The librarian writes through `curate` instead, its reads in the same transaction.
        """
        return self._write(lambda tx: _write_batch(tx, batch, expect_max_seq,
                                                   self.with_vector))

    def curate(self, work: Callable[[CurateTx], T]) -> T:
        """``work(view)`` in one write transaction: a curated part's reads (reports already
        curated, the shards' tops and new rows) and its write, through ``view``.

        The driver runs ``work`` again from the start after a transient error (and so does
        `_write` after a uniqueness conflict), with nothing of the failed try committed: it
        must change nothing outside the graph that a second run would get wrong (catching a
        cache up twice is harmless; adding the new insights to it waits for the commit).
        """
        return self._write(lambda tx: work(CurateTx(tx, self.with_vector)))

    def view(self, work: Callable[[CurateTx], T]) -> T:
        """``work(view)`` in one read transaction: the shards' tops and forget counts read
        once for many shards (`CurateTx.shard_tops`), then their new rows."""
        with self._outage(), self._session(read=True) as session:
            return session.execute_read(lambda tx: work(CurateTx(tx, self.with_vector)))

    def write(self, work: Callable[[ManagedTransaction], T]) -> T:
        """``work(tx)`` in one managed write transaction, retried from the start after a
        transient error or a uniqueness conflict (so it must be idempotent)."""
        return self._write(work)

    def _write(self, work, conflict_retries: int = 5) -> Any:
        """Run ``work`` in a managed write transaction (which retries transient errors).

        Two writers MERGEing the same shared node (a Run, an Expert, a Source) at once can
        both try to create it; Neo4j serialises that with locks, the embedded server reports a
        uniqueness violation instead. Every write here is idempotent, so such a conflict is
        retried from the start, after a jittered backoff, a few times.
        """
        for attempt in range(conflict_retries + 1):
            try:
                with self._outage(), self._session() as session:
                    return session.execute_write(work)
            except ConstraintError:
                if attempt == conflict_retries:
                    raise
                time.sleep(0.05 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def supported_reports(self, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Of (source id, report id) pairs, the reports already in the graph: report -> insight."""
        with self._outage(), self._session(read=True) as session:
            return _supported_reports(session, pairs)

    def insight_details(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Shard, summary, support count and a few source ids of each insight: id -> row."""
        if not ids:
            return {}
        with self._outage(), self._session(read=True) as session:
            return {rec["id"]: rec.data()
                    for rec in session.run(cypher.INSIGHT_DETAILS, ids=list(ids))}

    def job_items(self, job_id: str) -> list[dict[str, Any]]:
        """Each item of a job with the insight it became (``founded``) or joined, its
        constellation, the supervisor's score and the insight's text."""
        out = []
        for row in self._read_all(cypher.JOB_ITEMS, job=job_id):
            founded = any(insight_id(row["constellation"], r) == row["insight"]
                          for r in row.pop("reports") or [])
            out.append({**row, "founded": founded})
        return out

    def routing_scores(self, job_ids: Sequence[str]) -> list[float]:
        """The supervisor's score of each item these jobs filed (one per support edge)."""
        return [float(r["score"]) for r in self._read_all(cypher.ROUTING_SCORES,
                                                          jobs=list(job_ids))
                if r["score"] is not None]

    def _read_all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        with self._outage(), self._session(read=True) as session:
            return session.run(query, **params).data()

    def lookup(self, item_id: str) -> dict[str, Any] | None:
        """An insight's embedding and shard, or a source's text, by id (None: neither)."""
        row = self._read_one(cypher.LOOKUP, id=item_id)
        if not row.get("is_insight") and not row.get("is_source"):
            return None
        return row

    def other_models(self, shards: Sequence[str], model: str | None) -> int:
        """How many insights of these shards another model drafted (unsearched by it)."""
        if model is None:
            return 0
        return int(self._read_one(cypher.OTHER_MODELS, shards=list(shards),
                                  model=model).get("n") or 0)

    # -- reads for the cache ---------------------------------------------------------------
    def shards(self) -> list[str]:
        """The shards that hold at least one insight, sorted."""
        return sorted(self._read_one(cypher.SHARDS)["shards"])

    def constellations(self) -> list[str]:
        """Every constellation the graph knows (the shards insights may be written to)."""
        return sorted(self._read_one(cypher.CONSTELLATIONS)["ids"])

    def max_seq(self, shard: str) -> int:
        """The highest ``seq`` of a shard, -1 when it is empty."""
        record = self._read_one(cypher.MAX_SEQ, shard=shard)
        return -1 if record["seq"] is None else int(record["seq"])

    def count_after(self, shard: str, after: int = -1, model: str | None = None,
                    dim: int | None = None) -> int:
        """Insights of ``shard`` after seq ``after`` (of ``dim`` width and ``model``, if
        given)."""
        return int(self._read_one(cypher.COUNT_AFTER, shard=shard, after=after,
                                  model=model, dim=dim)["n"])

    def read_shard(self, shard: str, dim: int, after: int = -1, page: int = 5000,
                   model: str | None = None) -> ShardRows:
        """Insights of ``shard`` with ``seq > after`` (drafted by ``model``, if given), in seq
        order, into preallocated arrays (see `_read_shard`)."""
        with self._outage(), self._session(read=True) as session:
            return _read_shard(session, shard, dim, after, page, model)

    def _read_one(self, query: str, **params: Any) -> dict[str, Any]:
        with self._outage(), self._session(read=True) as session:
            return session.run(query, **params).single().data()

    # -- user queries ----------------------------------------------------------------------
    def run_cypher(self, query: str, params: dict[str, Any] | None = None,
                   write: bool = False) -> list[dict[str, Any]]:
        """Run a user's Cypher and return every row (see `stream_cypher`, which this is)."""
        with self.stream_cypher(query, params, write=write) as rows:
            return list(rows)

    @contextlib.contextmanager
    def stream_cypher(self, query: str, params: dict[str, Any] | None = None,
                      write: bool = False,
                      write_rows: int | None = None) -> Iterator[Iterator[dict[str, Any]]]:
        """A user's Cypher, its rows as an iterator; read-only unless ``write=True`` (which
        runs it as the store's own user, in a write transaction).

        A read-only query must pass `cypher_guard.check_read_only` (`ReadOnlyQueryError`
        otherwise, nothing sent), then runs on the reader driver where there is one, in a
        READ transaction that is always rolled back; a query type the server reports as a
        write (or schema change) is refused too. Rows come `FETCH_ROWS` at a time, so a
        caller that stops early holds no more; the server's query type after the run is read
        from a result read to its end (stopped early, the guard, the READ transaction and
        the reader user still stand). A write runs whole, in a managed transaction the
        driver may retry, so its rows cannot stream: it keeps the first ``write_rows``. It
        also moves every shard's forget count (`cypher.BUMP_ALL_EPOCHS`), in its transaction,
        so that running caches drop what it removed or changed.
        """
        params = params or {}
        if write:
            def work(tx: ManagedTransaction) -> list[dict[str, Any]]:
                result = tx.run(query, params)
                kept = [r.data() for r in itertools.islice(result, write_rows)]
                result.consume()  # the rest of the write still runs, before the commit
                # What it changed is not known here: every shard's cache re-reads.
                tx.run(cypher.BUMP_ALL_EPOCHS).consume()
                return kept
            with self._user_query():
                kept = self._write(work, conflict_retries=0)  # a user's write: not ours to retry
            yield iter(kept)
            return
        cypher_guard.check_read_only(query)
        driver = self.reader or self.driver
        with (self._outage(), self._user_query(),
              driver.session(database=self.database, default_access_mode="READ",
                             fetch_size=FETCH_ROWS) as session):
            tx = session.begin_transaction(timeout=self.read_timeout_s)  # Neo4j ends it there
            try:
                if self.dialect.explain_query_type:
                    _refuse_writes(_explain(tx, query, params), "planned")
                result = tx.run(query, params)
                summaries: list[ResultSummary] = []

                def rows() -> Iterator[dict[str, Any]]:
                    for record in result:
                        yield record.data()
                    summaries.append(result.consume())

                yield rows()
            finally:
                # Rows not read are DISCARDed first: the embedded server still runs the
                # query to its end (seconds for ten million rows, in its own memory).
                if not tx.closed():  # a failed query's transaction is closed already
                    tx.rollback()
        for summary in summaries:
            _refuse_writes(summary, "rolled back")

    def labels(self) -> list[str]:
        return sorted(r["label"] for r in self.run_cypher("CALL db.labels()"))

    def delete_shards(self, shards: Iterable[str]) -> None:
        """Remove a set of shards' insights (tests and resets; never the pipeline itself)."""
        self.run_cypher(f"MATCH (i:{cypher.INSIGHT}) WHERE i.shard IN $shards DETACH DELETE i",
                        {"shards": list(shards)}, write=True)


class CurateTx:
    """A curated part's transaction (`GraphStore.curate`): the reads the librarian needs and
    the write, on one transaction. The shards' tops are read once, in one query
    (`shard_tops`), and each `read_shard` after it starts from them instead of asking again.
    """

    def __init__(self, tx: ManagedTransaction, with_vector: bool = False) -> None:
        self.tx, self.with_vector = tx, with_vector
        self.tops: dict[str, int] = {}
        self.epochs: dict[str, int] = {}

    def supported_reports(self, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
        """As `GraphStore.supported_reports`, in this transaction."""
        return _supported_reports(self.tx, pairs)

    def shard_tops(self, shards: Iterable[str]) -> dict[str, int]:
        """The highest seq of each shard (-1 when empty), in one query; kept for
        `read_shard`."""
        shards = sorted(set(shards))
        found = {r["shard"]: int(r["seq"]) for r in self.tx.run(cypher.SHARD_TOPS,
                                                                shards=shards)
                 if r["seq"] is not None}
        self.tops.update({shard: found.get(shard, -1) for shard in shards})
        self.epochs.update(_epochs(self.tx, shards))
        return {shard: self.tops[shard] for shard in shards}

    def changed_sources(self, contents: dict[str, tuple[str, str]]) -> list[str]:
        """Of ``contents`` (source id -> (content hash, text)), the ids a Source already
        holds with other content: another hash, or, on a source stored before hashes, other
        text (a vector item's old source cannot tell, and counts as unchanged)."""
        if not contents:
            return []
        changed = []
        for row in self.tx.run(cypher.SOURCE_HASHES, ids=sorted(contents)):
            digest, text = contents[row["id"]]
            if row["hash"] is not None and row["hash"] != digest or (
                    row["hash"] is None and text and row["text"] != text):
                changed.append(row["id"])
        return changed

    def constellations(self) -> list[str]:
        """As `GraphStore.constellations`, in this transaction."""
        return sorted(self.tx.run(cypher.CONSTELLATIONS).single(strict=True)["ids"])

    def read_shard(self, shard: str, dim: int, after: int = -1, page: int = 5000,
                   model: str | None = None) -> ShardRows:
        """As `GraphStore.read_shard`, in this transaction, from the top `shard_tops` read."""
        return _read_shard(self.tx, shard, dim, after, page, model, self.tops.get(shard),
                           self.epochs.get(shard))

    def write_batch(self, batch: CuratedBatch,
                    expect_max_seq: dict[str, int] | None = None) -> dict[str, int]:
        """As `GraphStore.write_batch`, in this transaction."""
        return _write_batch(self.tx, batch, expect_max_seq, self.with_vector)


def _supported_reports(runner: Any, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Of (source id, report id) pairs, the reports already in the graph: report -> insight.
    ``runner`` is a session or a transaction."""
    rows_ = [{"source": s, "report": r} for s, r in pairs]
    if not rows_:
        return {}
    return {rec["report"]: rec["insight"]
            for rec in runner.run(cypher.SUPPORTED_REPORTS, rows=rows_)}


def _epochs(runner: Any, shards: Sequence[str]) -> dict[str, int]:
    """Each shard's forget count (0 for a shard no forget touched, or with no node yet)."""
    found = {r["shard"]: int(r["epoch"]) for r in runner.run(cypher.EPOCHS,
                                                             shards=list(shards))}
    return {shard: found.get(shard, 0) for shard in shards}


def _read_shard(runner: Any, shard: str, dim: int, after: int, page: int,
                model: str | None, top: int | None = None,
                epoch: int | None = None) -> ShardRows:
    """Insights of ``shard`` with ``seq > after`` (of ``model``, if given), in seq order, on
    ``runner`` (a session or a transaction); ``top`` and ``epoch``, the shard's max seq and
    forget count when the caller read them already.

    Pages are seq ranges up to the shard's current maximum; each page's embeddings are
    decoded with one ``frombuffer`` over the joined bytes, then the rows are sorted by seq.
    """
    if top is None:
        record = runner.run(cypher.MAX_SEQ, shard=shard).single()
        top = -1 if record["seq"] is None else int(record["seq"])
    if epoch is None:
        epoch = _epochs(runner, [shard])[shard]
    if top <= after:  # nothing new: the common case of a catch-up
        return ShardRows([], np.empty(0, np.int64), np.empty((0, dim), np.float16), [], top,
                         epoch)
    expected = int(runner.run(cypher.COUNT_AFTER, shard=shard, after=after, model=model,
                              dim=dim).single()["n"])
    ids: list[str] = []
    summaries: list[str] = []
    seqs = np.empty(expected, dtype=np.int64)
    emb = np.empty((expected, dim), dtype=np.float16)
    n, lo = 0, after
    while lo < top:
        rec = runner.run(cypher.PAGE_RANGE, shard=shard, lo=lo, hi=lo + page,
                         model=model, dim=dim).single()
        got = len(rec["ids"])
        if n + got > len(seqs):  # rows landed since the count: grow by doubling
            size = max(2 * len(seqs), n + got)
            seqs, emb = np.resize(seqs, size), np.resize(emb, (size, dim))
        if got:
            ids.extend(rec["ids"])
            summaries.extend(t or "" for t in rec["summaries"])
            seqs[n:n + got] = rec["seqs"]
            emb[n:n + got] = np.frombuffer(b"".join(rec["embeddings"]),
                                           dtype="<f2").reshape(got, dim)
            n += got
        lo += page
    order = np.argsort(seqs[:n], kind="stable")
    return ShardRows([ids[i] for i in order], seqs[:n][order], emb[:n][order],
                     [summaries[i] for i in order], top, epoch)


def _write_batch(tx: ManagedTransaction, batch: CuratedBatch,
                 expect_max_seq: dict[str, int] | None, with_vector: bool) -> dict[str, int]:
    """The statements of `GraphStore.write_batch`, on ``tx``; returns the row counts."""
    new_ids = {i.id for i in batch.insights}
    referenced = ({s.insight_id for s in batch.supports}
                  | {p.insight_id for p in batch.produced}
                  | {s.insight_id for s in batch.similar}
                  | {s.other_id for s in batch.similar})
    shards = sorted({i.shard for i in batch.insights})
    experts = sorted({p.expert for p in batch.produced})
    for shard, expected in (expect_max_seq or {}).items():
        seq = tx.run(cypher.MAX_SEQ, shard=shard).single(strict=True)["seq"]
        if (-1 if seq is None else int(seq)) != expected:
            raise StaleWriteError(shard, f"max seq is {seq}, the writer saw "
                                  f"{expected}: another writer got in")
    found = set(tx.run(cypher.EXISTING_INSIGHTS,
                       ids=sorted(new_ids | referenced)).single(strict=True)["ids"])
    missing = sorted(referenced - new_ids - found)
    if missing:
        shard = next(iter(expect_max_seq or {}), None) or (
            batch.insights[0].shard if batch.insights else "(unknown)")
        raise StaleWriteError(shard, f"insight {missing[0]} is not in the graph "
                              "(a stale cache?)")
    params = rows.batch_rows(batch, found, with_vector)
    if params["insights"]:
        tx.run(cypher.MERGE_HUBS, shards=shards, run=batch.run_id).consume()
    if experts:
        tx.run(cypher.MERGE_EXPERTS, experts=rows.expert_rows(experts)).consume()
    for statement, key in ((cypher.CREATE_INSIGHTS, "insights"),
                           (cypher.MERGE_SUPPORTS, "old_supports"),
                           (cypher.MERGE_PRODUCED, "old_produced"),
                           (cypher.MERGE_SIMILAR, "old_similar")):
        if params[key]:
            tx.run(statement, rows=params[key]).consume()
    grown = sorted({s.insight_id for s in batch.supports})
    if grown:
        # dict(record), not record.data(): that copies the embeddings' bytes one by one
        found_ = [dict(r) for r in tx.run(cypher.SUPPORT_EMBEDDINGS, ids=grown,
                                          cap=rows.MEDOID_MAX_SUPPORT)]
        texts = [r for f in found_ for r in rows.medoid_rows([f], int(f["dim"]))]
        if texts:
            tx.run(cypher.SET_TEXTS, rows=texts).consume()
    return {k: len(v) for k, v in params.items()}


def _open_driver(uri: str, auth: tuple[str, str], timeout_s: float) -> Driver:
    """A driver that the server answered (waiting up to ``timeout_s``); `GraphUnavailable`
    when it does not, or refuses the credentials."""
    # No server notifications: Neo4j's ("constraint already exists" for every statement of
    # ensure_schema, "property `model` does not exist" before the first insight) are logged by
    # the driver, and filled every worker's log and a command's stderr with lines of JSON.
    driver = GraphDatabase.driver(uri, auth=auth, max_transaction_retry_time=timeout_s,
                                  connection_acquisition_timeout=timeout_s,
                                  notifications_min_severity="OFF")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            driver.verify_connectivity()
            return driver
        except AuthError as err:
            driver.close()
            raise GraphUnavailable(uri, f"authentication of {auth[0]!r} failed "
                                   f"({err.message})") from err
        except (ServiceUnavailable, SessionExpired, OSError) as err:
            if time.monotonic() >= deadline:
                driver.close()
                raise GraphUnavailable(uri, f"no answer within {timeout_s:.0f} s "
                                       f"({err})") from err
            time.sleep(0.2)


_EXPLAIN = "EXPLAIN "


def _explain(tx: Any, query: str, params: dict[str, Any]) -> ResultSummary:
    """The plan's summary. A query the server cannot plan is reported as the user wrote it:
    Neo4j quotes the query it was sent, and counts columns from our prefix."""
    try:
        return tx.run(_EXPLAIN + query, params).consume()
    except ClientError as err:
        if isinstance(err, AuthError) or not err.message:
            raise
        shift = len(_EXPLAIN)

        def column(m: re.Match) -> str:
            return (f"(line 1, column {max(1, int(m.group(1)) - shift)} "
                    f"(offset: {max(0, int(m.group(2)) - shift)}))")

        message = re.sub(r"\(line 1, column (\d+) \(offset: (\d+)\)\)", column, err.message)
        raise QueryError(err.code or "", message.replace('"' + _EXPLAIN, '"')) from err


def _refuse_writes(summary: ResultSummary, when: str) -> None:
    """`ReadOnlyQueryError` if the server says the query writes or changes the schema."""
    if (summary.query_type in ("w", "rw", "s") or summary.counters.contains_updates
            or summary.counters.contains_system_updates):
        raise ReadOnlyQueryError(f"the server reports query type {summary.query_type!r} "
                                 f"({when})")
