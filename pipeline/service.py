"""`moe-pipeline serve`: the pipeline over HTTP, and a page to look at what it built.

FastAPI on uvicorn: its routes are typed Python, their OpenAPI document comes from the same
types (``/openapi.json``, browsable at ``/docs``), and it runs the same `Runtime`, stages and
ledger as the CLI. A warm process keeps the model, the encoder and the hot caches loaded, so a
question costs a cache scan, not a start-up.

Every route but ``/health`` and the page itself needs a bearer token (`pipeline.tokens`):
the read token reads; writing (a job, a ``write`` query, a forget) needs the write token. The
server listens on 127.0.0.1 unless told otherwise. Request bodies past ``max_body_mb`` are
refused with 413, and a query's rows stop at ``MAX_ROWS`` (the answer says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.datastructures import UploadFile  # what a parsed form holds (not FastAPI's)

from pipeline import __version__, jobs, stages, tokens
from pipeline.errors import PipelineError
from pipeline.redact import redacted
from pipeline.retract import forget
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.storage import cypher
from pipeline.storage.graph import QueryError, ReadOnlyQueryError
from pipeline.storage.owner import shown_status
from pipeline.storage.progress import progress
from pipeline.storage.sql import BatchMetrics, ItemError, Job

WEB = Path(__file__).resolve().parent / "web"
MAX_ROWS = 1000  # rows a query answers with at most
MAX_BODY_MB = 64.0  # a job's JSON Lines body, at most
SIMILAR_BATCH = 64  # questions answered together at most


class QueryBody(BaseModel):
    cypher: str = Field(min_length=1, max_length=100_000)
    params: dict[str, Any] = Field(default_factory=dict)
    write: bool = False


@dataclass(eq=False)
class _Asked:
    """A `similar` question waiting in `Service.similar`: ``turn`` is set when it is
    answered, or when its thread is to answer the next lot."""

    question: stages.Question
    answer: Any = None
    answered: bool = False
    turn: threading.Event = field(default_factory=threading.Event)


class Service:
    """What the app's routes share: the settings, one warm Runtime (its use serialised: the
    librarian's caches are not shared between threads), the metrics."""

    def __init__(self, settings: Settings, max_body_mb: float = MAX_BODY_MB) -> None:
        self.settings = settings
        self.max_body = int(max_body_mb * 2**20)
        self._rt: Runtime | None = None
        self.lock = threading.Lock()
        self._asking = threading.Lock()  # guards _pending and _answering
        self._pending: list[_Asked] = []
        self._answering = False  # a thread is answering a lot of questions
        self.registry = CollectorRegistry()
        self.latency = Histogram("moe_request_seconds", "request latency by route",
                                 ["route"], registry=self.registry)
        self.lot_size = Histogram("moe_similar_lot_size", "similar questions answered together",
                                  buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.requests = Counter("moe_requests", "requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.gauges = {name: Gauge(f"moe_{name}", text, labels, registry=self.registry)
                       for name, text, labels in (
                           ("jobs", "jobs by status", ["status"]),
                           ("items", "items submitted, all jobs", []),
                           ("bad_items", "bad items recorded, all jobs", []),
                           ("dedup_rate", "share of reports merged into an insight", []))}

    def similar(self, question: stages.Question) -> stages.SimilarAnswer:
        """One question's answer. Questions answer in lots: the thread that finds nobody
        answering answers every question waiting then (up to `SIMILAR_BATCH`) in one
        `stages.similar_many` (one encoder pass, one model forward, one catch-up and one
        search per constellation for the lot), then hands the turn to the oldest question
        still waiting, whose thread answers the next lot. So 16 clients asking at once cost
        little more than one, and no thread answers more than one lot."""
        me = _Asked(question)
        with self._asking:
            self._pending.append(me)
            lead = not self._answering
            self._answering = True
        if lead:
            self._answer_lot()
        while not me.answered:
            me.turn.wait()
            me.turn.clear()
            if not me.answered:  # handed the turn: its own question is in this lot
                self._answer_lot()
        if isinstance(me.answer, BaseException):
            raise me.answer
        return me.answer

    def _answer_lot(self) -> None:
        """Answer the questions waiting now, then hand the turn on, whatever happened: a
        lot that fails (the graph, say) gives every question of it the error; one cut by a
        BaseException (an interrupt) gives them that, then lets it go on."""
        lot: list[_Asked] = []
        escaped: BaseException | None = None
        try:
            with self.lock:  # the lot is taken once the Runtime is free: it takes all then
                with self._asking:
                    lot = self._pending[:SIMILAR_BATCH]
                    del self._pending[:SIMILAR_BATCH]
                self.lot_size.observe(len(lot))
                answers: list[Any] = stages.similar_many(self.rt, [a.question for a in lot])
            if len(answers) != len(lot):
                raise RuntimeError(f"{len(answers)} answers to {len(lot)} questions")
        except Exception as err:
            answers = [err] * len(lot)
        except BaseException as err:
            answers, escaped = [err] * len(lot), err
        finally:
            for asked, answer in zip(lot, answers, strict=True):
                asked.answer, asked.answered = answer, True
            with self._asking:
                after = self._pending[0] if self._pending else None
                self._answering = after is not None
            for asked in lot:
                asked.turn.set()
            if after is not None:
                after.turn.set()
        if escaped is not None:
            raise escaped

    @property
    def rt(self) -> Runtime:
        if self._rt is None:
            self._rt = Runtime.from_settings(self.settings)
        return self._rt

    def close(self) -> None:
        if self._rt is not None:
            self._rt.close()


def _job_row(job: Job, now: float) -> dict[str, Any]:
    return {"id": job.id, "status": shown_status(job, now), "mode": job.mode,
            "items": job.submitted_items, "run_id": job.run_id,
            "created_at": job.created_at, "finished_at": job.finished_at,
            "error": redacted(job.error) if job.error else None}


def create_app(settings: Settings, max_body_mb: float = MAX_BODY_MB) -> FastAPI:
    """The application: routes, the page, the metrics; tokens made if missing."""
    tokens.ensure(settings.state_dir)
    svc = Service(settings, max_body_mb)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        svc.close()

    app = FastAPI(title="moe-pipeline", version=__version__, lifespan=lifespan,
                  description="Jobs, questions and the insight graph of moe-pipeline. Every "
                              "route but /health needs `Authorization: Bearer TOKEN` "
                              "(moe-pipeline token; --write for writes).")
    app.state.service = svc

    def need(scope: str) -> Callable[..., str]:
        def check(authorization: str | None = Header(default=None)) -> str:
            given = None
            if authorization and authorization[:7].lower() == "bearer ":
                given = authorization[7:].strip()
            granted = tokens.scope_of(settings.state_dir, given)
            if granted is None:
                raise HTTPException(401, "a bearer token is needed (moe-pipeline token)",
                                    headers={"WWW-Authenticate": "Bearer"})
            if scope == "write" and granted != "write":
                raise HTTPException(403, "this needs the write token (moe-pipeline token "
                                         "--write)")
            return granted
        return check

    read, write = Depends(need("read")), Depends(need("write"))

    @app.middleware("http")
    async def measure(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > svc.max_body:
            return JSONResponse({"detail": f"request body over {svc.max_body} bytes"}, 413)
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        svc.latency.labels(name).observe(time.perf_counter() - start)
        svc.requests.labels(name, str(response.status_code)).inc()
        return response

    @app.exception_handler(PipelineError)
    async def pipeline_error(request: Request, err: PipelineError) -> JSONResponse:
        return JSONResponse({"detail": redacted(str(err))}, 422)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/app.js", include_in_schema=False)
    def script() -> FileResponse:
        return FileResponse(WEB / "app.js", media_type="text/javascript")

    # -- jobs ------------------------------------------------------------------------------
    @app.post("/jobs", status_code=202, dependencies=[write])
    async def submit_job(request: Request,
                         batch_size: int | None = Query(default=None, ge=1, le=65536)
                         ) -> dict[str, Any]:
        """A JSON Lines body of items (``application/x-ndjson``), or a file uploaded as the
        ``file`` field of a ``multipart/form-data`` body: queued to the workers when a broker
        is configured, run in this process otherwise."""
        spool = settings.state_dir / "spool"
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = spool / f"api-{uuid.uuid4().hex}.jsonl"
        chunks: AsyncIterator[bytes]
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "a multipart body needs the items as its 'file' "
                                         "field")
            chunks = _read_upload(upload)
        else:
            chunks = request.stream()
        size = 0
        with path.open("wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > svc.max_body:
                    f.close()
                    path.unlink(missing_ok=True)
                    raise HTTPException(413, f"request body over {svc.max_body} bytes")
                f.write(chunk)
        if size == 0:
            path.unlink(missing_ok=True)
            raise HTTPException(422, "the body holds no items: send JSON Lines, one item "
                                     "per line")
        return await asyncio.to_thread(_start_job, settings, path, batch_size)

    @app.get("/jobs", dependencies=[read])
    def list_jobs(limit: int = Query(default=20, ge=1, le=1000)) -> list[dict[str, Any]]:
        now = time.time()
        with svc.rt.Session() as s:
            rows = s.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)).all()
            return [_job_row(j, now) for j in rows]

    @app.get("/jobs/{job_id}", dependencies=[read])
    def get_job(job_id: str) -> dict[str, Any]:
        now = time.time()
        with svc.rt.Session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id!r}")
            out = _job_row(job, now)
            out["batches"] = [{"index": b.index, "status": b.status, "attempts": b.attempts,
                               "items": len(b.item_ids)} for b in job.batches]
            out["bad_items"] = [{"line": e.line, "id": e.item_id, "field": e.field,
                                 "message": e.message} for e in job.item_errors]
        state = progress(svc.rt.Session, job_id)
        out["progress"] = {"batches": state.batches, "finished": state.finished,
                           "failed": state.failed, "items_done": state.items_done}
        return out

    @app.get("/jobs/{job_id}/events", dependencies=[read])
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: the job's progress as it moves, until it finishes."""
        with svc.rt.Session() as s:
            if s.get(Job, job_id) is None:
                raise HTTPException(404, f"no job {job_id!r}")

        async def events() -> AsyncIterator[str]:
            last = None
            while True:
                state = await asyncio.to_thread(progress, svc.rt.Session, job_id)
                now = {"status": state.status, "batches": state.batches,
                       "finished": state.finished, "failed": state.failed,
                       "items_done": state.items_done}
                if now != last:
                    yield f"data: {json.dumps(now)}\n\n"
                    last = now
                if state.status not in ("queued", "running"):
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- questions -------------------------------------------------------------------------
    @app.post("/query")
    def query(body: QueryBody, scope: str = read) -> dict[str, Any]:
        """Cypher over the insights: read-only (refused by the server too) unless ``write``,
        which needs the write token."""
        if body.write and scope != "write":
            raise HTTPException(403, "a write query needs the write token "
                                     "(moe-pipeline token --write)")
        rows: list[dict[str, Any]] = []
        truncated = False
        try:
            with svc.lock, svc.rt.graph.stream_cypher(body.cypher, body.params,
                                                      write=body.write,
                                                      write_rows=MAX_ROWS + 1) as found:
                for row in found:
                    if len(rows) == MAX_ROWS:
                        truncated = True
                        break
                    rows.append(row)
        except ReadOnlyQueryError as err:
            raise HTTPException(403, f"refused: {err}") from err
        except QueryError as err:
            raise HTTPException(422, str(err)) from err
        return json.loads(json.dumps({"rows": rows, "truncated": truncated}, default=_plain))

    @app.get("/similar", dependencies=[read])
    def similar(text: str = Query(min_length=1, max_length=20_000),
                k: int = Query(default=10, ge=1, le=100),
                constellation: str | None = None,
                min_score: float | None = Query(default=None, ge=-1, le=1)) -> dict[str, Any]:
        return svc.similar(stages.Question(text, None, k, constellation, min_score)
                           ).to_message()

    # -- the graph -------------------------------------------------------------------------
    @app.get("/constellations", dependencies=[read])
    def constellations() -> list[dict[str, Any]]:
        with svc.lock:
            rt = svc.rt
            descriptions = rt.config.constellation_descriptions()
            names = list(rt.system.constellation.names)
            counts = {r["shard"]: r for r in rt.graph.run_cypher(
                f"MATCH (i:{cypher.INSIGHT}) WHERE i.shard IN $names "
                f"OPTIONAL MATCH (i)-[:{cypher.SUPPORTED_BY}]->(s:{cypher.SOURCE}) "
                "RETURN i.shard AS shard, count(DISTINCT i) AS insights, "
                "count(DISTINCT s) AS sources", {"names": names})}
            groups = rt.system.constellation
            members = {n: [groups.expert_names[e] for e in groups.members(n)] for n in names}
        return [{"name": n, "description": descriptions.get(n, ""), "experts": members[n],
                 "insights": int(counts.get(n, {}).get("insights", 0)),
                 "sources": int(counts.get(n, {}).get("sources", 0))} for n in names]

    @app.get("/insights/{insight_id}", dependencies=[read])
    def insight(insight_id: str) -> dict[str, Any]:
        with svc.lock:
            rows = svc.rt.graph.run_cypher(INSIGHT_PAGE, {"id": insight_id})
        if not rows:
            raise HTTPException(404, f"no insight {insight_id!r}")
        row = rows[0]
        return {"id": insight_id, "shard": row["shard"], "text": row["text"],
                "sources": [s for s in row["sources"] if s.get("id") is not None],
                "experts": sorted((e for e in row["experts"] if e.get("name") is not None),
                                  key=lambda e: -(e["weight"] or 0)),
                "similar": sorted((n for n in row["similar"] if n.get("id") is not None),
                                  key=lambda n: -(n["score"] or 0)),
                "shared": [n for n in row["shared"] if n.get("id") is not None]}

    @app.delete("/sources/{source_id}", dependencies=[write])
    def forget_source(source_id: str) -> dict[str, Any]:
        with svc.lock:
            done = forget(svc.rt, [source_id])
        return {"forgotten": source_id, "counts": done.counts, "shards": done.shards}

    @app.get("/metrics", dependencies=[read], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        with svc.rt.Session() as s:
            by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status))
                             .all())
            items = s.scalar(select(func.coalesce(func.sum(Job.submitted_items), 0)))
            bad = s.scalar(select(func.count()).select_from(ItemError))
            reports, merged = s.execute(select(func.coalesce(func.sum(BatchMetrics.reports), 0),
                                               func.coalesce(func.sum(BatchMetrics.merged), 0))
                                        ).one()
        gauges = svc.gauges
        for status, n in by_status.items():
            gauges["jobs"].labels(status).set(n)
        gauges["items"].set(items or 0)
        gauges["bad_items"].set(bad or 0)
        gauges["dedup_rate"].set((merged / reports) if reports else 0.0)
        return PlainTextResponse(generate_latest(svc.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    return app


# An insight's page: its text, each source with its text, the experts and weights that
# produced it, its SIMILAR_TO neighbours (either way) and insights sharing a source.
INSIGHT_PAGE = f"""
MATCH (i:{cypher.INSIGHT} {{id: $id}})
OPTIONAL MATCH (i)-[e:{cypher.SUPPORTED_BY}]->(s:{cypher.SOURCE})
WITH i, collect({{id: s.id, text: s.text, score: e.weight}}) AS sources
OPTIONAL MATCH (i)-[p:{cypher.PRODUCED_BY}]->(x:{cypher.EXPERT})
WITH i, sources, collect({{name: x.name, weight: p.weight}}) AS experts
OPTIONAL MATCH (i)-[r:{cypher.SIMILAR_TO}]-(n:{cypher.INSIGHT})
WITH i, sources, experts,
     collect({{id: n.id, score: r.score, text: coalesce(n.text, n.summary),
              shard: n.shard}}) AS similar
OPTIONAL MATCH (i)-[:{cypher.SUPPORTED_BY}]->(:{cypher.SOURCE})<-[:{cypher.SUPPORTED_BY}]-(o)
WHERE o.id <> i.id
WITH i, sources, experts, similar,
     collect(DISTINCT {{id: o.id, text: coalesce(o.text, o.summary), shard: o.shard}})
       AS shared
RETURN i.shard AS shard, coalesce(i.text, i.summary) AS text, sources, experts, similar,
       shared
"""


async def _read_upload(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


def _plain(value: Any) -> Any:
    """What JSON cannot hold as it is: bytes as hex, anything else as its text."""
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return str(value)


def _start_job(settings: Settings, path: Path, batch_size: int | None) -> dict[str, Any]:
    """Queue the spooled file (a broker is configured) or run it on a thread of this process;
    returns once the job is recorded."""
    if settings.celery_broker_url:
        try:
            queued = jobs.submit(path, settings, batch_size)
        finally:
            path.unlink(missing_ok=True)
        return {"id": queued.job_id, "mode": "queued", "batches": queued.batches,
                "items": queued.items}
    opened: dict[str, Any] = {}
    ready = threading.Event()

    def started(job_id: str) -> None:
        opened["id"] = job_id
        ready.set()

    def work() -> None:
        try:
            jobs.run_local(path, settings, batch_size, on_open=started)
        except BaseException as err:  # reported to the request if the job never opened
            opened.setdefault("error", str(err))
        finally:
            ready.set()
            path.unlink(missing_ok=True)

    threading.Thread(target=work, name="api-job", daemon=True).start()
    ready.wait()
    if "id" not in opened:
        raise PipelineError(opened.get("error") or "the job did not start")
    return {"id": opened["id"], "mode": "local"}
