"""Commands that run the pipeline: ``run``, ``submit``, ``status``, ``stats``, ``worker``,
``forget``."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import click

from pipeline.cli.bounds import Count, seconds
from pipeline.cli.progress import note_server_start, progress
from pipeline.cli.text import printable
from pipeline.errors import PipelineError
from pipeline.redact import masked, redacted
from pipeline.settings import MAX_BATCH_SIZE, Settings

BATCH_HELP = "items per batch [default: MOE_BATCH_SIZE, 256]"


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--batch-size", type=Count(1, MAX_BATCH_SIZE), default=None,
              help=BATCH_HELP)
@click.pass_obj
def run(settings: Settings, file: str, batch_size: int | None) -> None:
    """Run a JSONL file of items through the pipeline, in this process (embedded default).

    The file is read a batch at a time. If the process dies, `status` shows the job
    interrupted; running the same file again resumes it."""
    from pipeline.jobs import run_local

    note_server_start(settings)
    with contextlib.ExitStack() as stack:
        bar: list[Any] = []

        def show(n: int, total: int) -> None:  # the bar opens once the file is counted
            if not bar:
                bar.append(stack.enter_context(progress(total, "items")))
            bar[0].update(n)

        summary = run_local(file, settings, batch_size=batch_size, progress=show)
    click.echo(f"job {summary.job_id} {summary.status}: {summary.items} items "
               f"({summary.bad_items} bad), {summary.reports} draft reports -> "
               f"{summary.inserted} new insights, {summary.merged} merged, "
               f"in {summary.seconds:.1f} s")
    click.echo(f"graph: {masked(settings.neo4j_uri) or 'embedded (moe-pipeline status)'}; "
               f"run id {summary.run_id}")


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--batch-size", type=Count(1, MAX_BATCH_SIZE), default=None,
              help=BATCH_HELP)
@click.option("--wait", is_flag=True, help="show progress until the job finishes")
@click.option("--timeout", type=seconds(), default=None, help="seconds to wait at most")
@click.pass_obj
def submit(settings: Settings, file: str, batch_size: int | None, wait: bool,
           timeout: float | None) -> None:
    """Queue a JSONL file of items for the Celery workers (the stack)."""
    from pipeline import jobs
    from pipeline.storage.sql import session_factory

    job = jobs.submit(file, settings, batch_size)
    click.echo(f"job {job.job_id} queued: {job.batches} batches "
               f"(broker {masked(settings.broker_url())}; run {job.run_id})")
    if not wait:
        click.echo(f"follow it with: moe-pipeline status {job.job_id}")
        return
    Session = session_factory(settings.sql_url(), run_migrations=False)
    with progress(job.items, "items") as bar:
        seen = [0]

        def show(state: jobs.Progress) -> None:
            bar.update(state.items_done - seen[0])
            seen[0] = state.items_done

        state = jobs.wait(Session, job.job_id, timeout, on_progress=show)
    click.echo(f"job {job.job_id} {state.status}: {state.finished - state.failed}/"
               f"{state.batches} batches completed, {state.failed} failed")
    if state.status == "failed":
        raise PipelineError(f"job {job.job_id} failed; see moe-pipeline status {job.job_id}")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("kind", type=click.Choice(["gpu", "librarian", "query"]))
@click.option("--shards", multiple=True,
              help="librarian: comma-separated constellation names (or their queue names); "
                   "repeatable [default: every constellation of the served model]")
@click.option("--concurrency", type=Count(1, 256), default=1, show_default=True,
              help="pool processes (one per GPU for gpu workers)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--name", help="Celery node name, %h for the host [default: KIND-PID@%h]")
@click.pass_context
def worker(ctx: click.Context, kind: str, shards: tuple[str, ...], concurrency: int,
           loglevel: str, name: str | None) -> None:
    """Run a Celery worker of one kind with its queues and pool (extra args go to Celery).

    Pools are prefork: each pool process loads its model or graph once, after the fork,
    so a GPU is first touched in the child, never in the parent that forks.
    """
    from pipeline.queue import worker as queue_worker
    from pipeline.serving import model_config

    settings: Settings = ctx.obj
    known = [n for n, _ in model_config(settings).constellation_members()]
    names = queue_worker.shard_names(shards, known) if shards else known
    queues = ",".join(queue_worker.queues(kind, names))
    click.echo(f"{kind} worker on queues {queues} (broker {masked(settings.broker_url())})",
               err=True)
    queue_worker.serve(settings, kind, names, concurrency, loglevel, name, ctx.args)


def _job_status(job, now: float) -> str:  # a `sql.Job` row
    from pipeline.storage.owner import shown_status

    return shown_status(job, now)


def _resume_hint(job, now: float) -> str:  # a `sql.Job` row
    """How to finish an interrupted or stopped job, where it can be resumed."""
    from pipeline.storage.ledger import STOPPED

    stopped = job.status == "failed" and (job.error or "").startswith(STOPPED)
    if job.resume_command and (stopped or _job_status(job, now) == "interrupted"):
        return f"  (resume: {printable(job.resume_command)})"
    return ""


def _waiting(row, queue: str, settings: Settings, now: float) -> str:
    """Why a batch or part that is not finished waits: for a worker, or on its worker."""
    if row.status == "queued":
        return f"  (waiting for a worker on queue {queue})"
    if row.status not in ("running", "routing"):
        return ""
    heard = now - (row.heartbeat_at or row.updated_at)
    why = f"  (on {row.worker}, last heard {heard:.0f} s ago"
    if heard > settings.lease_timeout_s:
        why += (f": silent past the {settings.lease_timeout_s:.0f} s lease, so presumed dead; "
                "a running worker hands it back to the broker")
    if row.requeues:
        why += f"; requeued {row.requeues}x"
    return why + ")"


@click.command()
@click.argument("job_id", required=False)
@click.option("--limit", type=Count(1, 10_000), default=10, show_default=True,
              help="jobs listed without JOB_ID")
@click.option("--items", "show_items", is_flag=True,
              help="with JOB_ID: which insight each item became or joined (reads the graph)")
@click.pass_obj
def status(settings: Settings, job_id: str | None, limit: int, show_items: bool) -> None:
    """Where the graph and SQL are; the latest jobs, or one job's batches and errors."""
    from sqlalchemy import select

    from pipeline.queue.app import librarian_queue
    from pipeline.storage.embedded import LocalGraphServer
    from pipeline.storage.sql import Job, session_factory

    if show_items and job_id is None:
        raise click.UsageError("--items needs a JOB_ID")
    env_file = settings.env_file_names()
    if env_file:
        names = ", ".join(env_file[1]) or "nothing the environment does not set already"
        click.echo(f"settings: {printable(str(env_file[0]))} chose {printable(names)}")
    click.echo(f"state dir: {settings.state_dir.resolve()} ({settings.state_dir_source()})")
    if settings.neo4j_uri:
        click.echo(f"graph: {masked(settings.neo4j_uri)} (NEO4J_URI)")
    else:
        info = LocalGraphServer(settings.state_dir).running()
        click.echo(f"graph: embedded in {settings.state_dir.resolve() / 'graph'}, "
                   f"{'up at ' + info.uri if info else 'down'}")
    click.echo(f"sql: {masked(settings.sql_url())}")
    Session = session_factory(settings.sql_url())
    with Session() as s:
        if job_id is None:
            jobs = s.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)).all()
            now = time.time()
            for job in jobs:
                done = sum(b.status == "completed" for b in job.batches)
                click.echo(f"{job.id}  {_job_status(job, now):<22} {job.submitted_items:>7} "
                           f"items  {done}/{len(job.batches)} batches  "
                           f"{len(job.item_errors)} bad{_resume_hint(job, now)}")
            if not jobs:
                click.echo("no jobs yet")
            return
        job = s.get(Job, job_id)
        if job is None:
            raise PipelineError(f"no job {job_id!r} in {masked(settings.sql_url())}")
        now = time.time()
        error = f", error: {printable(redacted(job.error))}" if job.error else ""
        click.echo(f"job {job.id}: {_job_status(job, now)}, {job.submitted_items} items, "
                   f"run {job.run_id}{error}{_resume_hint(job, now)}")
        for b in job.batches:
            m = b.metrics
            timing = " ".join(f"{k}={v:.2f}s" for k, v in b.timings.items())
            tail = (f"  reports={m.reports} new={m.new_insights} merged={m.merged}"
                    if m else "")
            click.echo(f"  batch {b.index:>4} {b.status:<10} attempts={b.attempts} "
                       f"{timing}{tail}{_waiting(b, 'gpu', settings, now)}")
            if b.status == "failed" and b.error:
                click.echo(f"    why: {printable(redacted(b.error))}")
            for part in b.parts:
                if part.status not in ("done", "failed"):
                    click.echo(f"    part '{printable(part.shard)}' {part.status} "
                               f"attempts={part.attempts}"
                               + _waiting(part, librarian_queue(part.shard), settings, now))
                elif part.status == "failed":
                    click.echo(f"    part '{printable(part.shard)}' failed: "
                               f"{printable(redacted(part.error or ''))}")
        for e in job.item_errors:
            click.echo(f"  bad item line {e.line} id {printable(e.item_id)}: "
                       f"{printable(e.field)}: {printable(e.message)}")
    if show_items:
        _item_insights(settings, job_id)


def _item_insights(settings: Settings, job_id: str) -> None:
    from pipeline.storage.connect import open_graph

    note_server_start(settings)
    with open_graph(settings) as graph:
        rows = graph.job_items(job_id)
    for r in rows:
        what = "became" if r["founded"] else "joined"
        click.echo(f"  item {printable(r['item'])} {what} {printable(r['insight'])} "
                   f"({printable(r['constellation'])}, score {r['score']:.2f}): "
                   f"{printable((r['text'] or '')[:60])}")
    if not rows:
        click.echo("  no item of this job is in the graph yet")


# What `stats --plot` can write (matplotlib's Agg canvas), by file extension.
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps")


def _plot_target(path: str) -> None:
    """Refuse a --plot file that cannot be written, before any figure is computed."""
    from pathlib import Path

    target = Path(path)
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise click.BadParameter(f"{path}: unknown image format {suffix or '(no extension)'!r}"
                                 f"; use one of {', '.join(PLOT_FORMATS)}", param_hint="--plot")
    folder = target.parent
    if not folder.is_dir():
        raise click.BadParameter(f"{path}: no folder {str(folder)!r} to write it in",
                                 param_hint="--plot")


@click.command()
@click.argument("run_id", required=False)
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="also draw expert and constellation usage into this image (.png, .svg, .pdf)")
@click.pass_obj
def stats(settings: Settings, run_id: str | None, plot_file: str | None) -> None:
    """Expert and constellation usage, routing entropy and dedup rate of a run (latest)."""
    from pipeline import stats as run_stats
    from pipeline.storage.sql import session_factory

    if plot_file:
        _plot_target(plot_file)
    st = run_stats.run_stats(session_factory(settings.sql_url()), run_id)
    click.echo(f"run {st.run_id}: {st.jobs} jobs, {st.batches} batches, {st.items} items")
    click.echo(f"draft reports {st.reports}  new insights {st.new_insights}  merged "
               f"{st.merged}  dedup rate {st.dedup_rate:.1%}")
    within = (f"the most routing can reach, among the {st.choices} experts of a constellation"
              if st.members else f"uniform over {st.choices} experts")
    click.echo(f"routing entropy {st.routing_entropy:.3f} nats ({within}: "
               f"{st.reachable_entropy:.3f})  balance loss {st.balance_loss:.3f}")
    shown = {k: printable(k) for k in [*st.expert_usage, *st.constellation_usage]}
    width = max([len(v) for v in shown.values()] + [6])
    click.echo(f"{'expert':<{width}}  share   constellation")
    for name, share in st.expert_usage.items():
        bar = "#" * round(share * 40)
        click.echo(f"{shown[name]:<{width}}  {share:6.1%}  "
                   f"{printable(', '.join(st.constellations_of(name))):<14}"
                   f"  {bar}")
    click.echo(f"{'constellation':<{width}}  share of reports")
    for name, share in st.constellation_usage.items():
        click.echo(f"{shown[name]:<{width}}  {share:6.1%}  {'#' * round(share * 40)}")
    for note in st.starved():
        click.echo(printable(note))
    from pipeline.storage.connect import open_graph
    from pipeline.storage.graph import GraphUnavailable
    from pipeline.storage.ledger import run_job_ids

    note_server_start(settings)
    try:
        with open_graph(settings) as graph:
            scores = graph.routing_scores(run_job_ids(session_factory(settings.sql_url()),
                                                      st.run_id))
    except GraphUnavailable as err:  # the figures above come from SQL and stand
        click.echo(f"routing confidence: not read ({err})")
        return
    for line in run_stats.confidence_lines(scores):
        click.echo(line)
    if plot_file:
        run_stats.plot(st, plot_file)
        click.echo(f"chart written to {plot_file}")


@click.command()
@click.argument("sources", nargs=-1)
@click.option("--source", "more", multiple=True, metavar="ID",
              help="a source (item) id to forget; may be repeated")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False),
              help="forget every item id of this JSON Lines file")
@click.option("--job", "job", metavar="JOB", help="forget what this job filed")
@click.option("--dry-run", is_flag=True, help="say what would change, change nothing")
@click.option("--queue/--local", "via_queue", default=None,
              help="have a query worker do it, or do it here [default: the queue when "
                   "CELERY_BROKER_URL is set]")
@click.option("--timeout", type=seconds(), default=600.0, show_default=True,
              help="seconds to wait for a query worker")
@click.pass_obj
def forget(settings: Settings, sources: tuple[str, ...], more: tuple[str, ...],
           file: str | None, job: str | None, dry_run: bool, via_queue: bool | None,
           timeout: float) -> None:
    """Take sources back out of the graph, with everything that followed from them.

    Their supports and Source nodes go; an insight left with no support goes; one that keeps
    support is re-represented from what remains; every cache learns of it; their bad-item
    records go. Name sources by id, by --file, or by --job. In the stack a query worker
    does it, under the shard locks the librarians take."""
    from pipeline.inputs import file_ids

    ids = [*sources, *more, *(file_ids(file) if file else [])]
    if job is not None and ids:
        raise click.UsageError("give source ids (or --file) or --job, not both")
    if job is None and not ids:
        raise click.UsageError("name what to forget: source ids, --file FILE or --job JOB")
    from pipeline.retract import ForgetResult
    from pipeline.retract import forget as forget_

    if bool(settings.celery_broker_url) if via_queue is None else via_queue:
        from pipeline.queue.app import FORGET, ask
        from pipeline.queue.messages import ForgetRequest

        message = ForgetRequest(ids, job, dry_run).to_message()
        done = ForgetResult.from_message(ask(settings, FORGET, message, timeout))
    else:
        from pipeline.runtime import Runtime

        note_server_start(settings)
        with Runtime.from_settings(settings) as rt:
            done = forget_(rt, ids, job=job, dry_run=dry_run)
    c = done.counts
    verb = "would forget" if done.dry_run else "forgot"
    click.echo(f"{verb} {c['sources']} source(s): {c['supports']} support(s) removed"
               + (f", {c['supports_thinned']} kept by other jobs" if c["supports_thinned"]
                  else "")
               + f"; {c['insights_removed']} insight(s) removed, "
               f"{c['insights_rerepresented']} re-represented"
               + (f", {c['insights_merged']} merged into another" if c.get("insights_merged")
                  else "")
               + (f" in {printable(', '.join(done.shards))}" if done.shards else ""))
    if done.unknown:
        shown = ", ".join(printable(i) for i in done.unknown[:5])
        more_ = f" and {len(done.unknown) - 5} more" if len(done.unknown) > 5 else ""
        click.echo(f"unknown: {len(done.unknown)} id(s) no source has ({shown}{more_}); "
                   "nothing changed for them", err=True)


COMMANDS = [run, submit, worker, status, stats, forget]
