"""The `moe-pipeline` command line.

Every `PipelineError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import click
import torch

from pipeline.config import GATE_TYPES, MoEConfig, Settings
from pipeline.errors import PipelineError
from pipeline.moe.analysis import entropy, expert_usage, parameter_counts
from pipeline.moe.layer import MoELayer


@click.group()
def cli() -> None:
    """moe-pipeline: mixture-of-experts routing, deduplicated insights in a graph."""


def _mixture_task(num_tasks: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A mixture of linear regression problems: the cluster an input is in picks its map."""
    centres = torch.randn(num_tasks, dim, generator=gen) * 3
    maps = torch.randn(num_tasks, dim, dim, generator=gen) / dim**0.5
    return centres, maps


def _batch(centres, maps, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    task = torch.randint(0, centres.shape[0], (n,), generator=gen)
    x = centres[task] + torch.randn(n, centres.shape[1], generator=gen)
    y = torch.einsum("nd,nde->ne", x, maps[task])
    return x, y


@cli.command()
@click.option("--gate", "gate_type", type=click.Choice(GATE_TYPES), default="topk",
              show_default=True)
@click.option("--experts", "num_experts", default=8, show_default=True)
@click.option("--top-k", "top_k", default=2, show_default=True)
@click.option("--expert-type", type=click.Choice(["standard", "gated", "cur"]),
              default="gated", show_default=True)
@click.option("--steps", default=200, show_default=True)
@click.option("--dim", default=32, show_default=True)
def demo(gate_type: str, num_experts: int, top_k: int, expert_type: str, steps: int,
         dim: int) -> None:
    """Train one MoE layer on a mixture of regression problems and show its routing."""
    settings = Settings()
    torch.manual_seed(settings.seed)
    device = settings.torch_device()
    cfg = MoEConfig(input_dim=dim, hidden_dim=4 * dim, output_dim=dim, num_experts=num_experts,
                    top_k_experts=1 if gate_type == "switch" else top_k, gate_type=gate_type,
                    expert_type=expert_type, cur_rank=min(16, dim))
    layer = MoELayer(cfg).to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    centres, maps = _mixture_task(4, dim, gen)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    counts = parameter_counts(layer)
    click.echo(f"MoE layer: {num_experts} {expert_type} experts, gate={gate_type}, "
               f"k={cfg.top_k_experts}, {counts['total']:,} parameters "
               f"({counts['active']:,} active per token), device={device}")
    start, losses = time.perf_counter(), []
    for step in range(steps):
        x, y = (t.to(device) for t in _batch(centres, maps, 256, gen))
        out, aux = layer(x)
        loss = torch.nn.functional.mse_loss(out, y)
        opt.zero_grad(set_to_none=True)
        (loss + aux.loss).backward()
        opt.step()
        layer.update_balance_bias(aux.counts)
        losses.append(loss.item())  # logging sync, outside the layer's forward
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            click.echo(f"  step {step:4d}  task loss {losses[-1]:.4f}  "
                       f"balance {aux.balance_loss.item():.3f}")
    elapsed = time.perf_counter() - start
    layer.eval()
    with torch.no_grad():
        x, _ = _batch(centres, maps, 4096, gen)
        out, aux = layer(x.to(device))
    usage = expert_usage(aux)
    click.echo(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps "
               f"({steps * 256 / elapsed:,.0f} training tokens/s)")
    click.echo("expert usage (% of assignments): " + "  ".join(
        f"e{i}:{p:.1f}" for i, p in enumerate(usage["percent"])))
    if cfg.gate_type in ("topk", "switch", "noisy_topk"):
        probs = layer.gate.router(x.to(device)).softmax(-1)
        h = entropy(probs)
        click.echo(f"routing entropy {h['entropy']:.3f} nats ({h['normalized']:.0%} of maximum)")


def _load_llama(model_path: str, tokenizer_path: str | None):
    from pathlib import Path

    from pipeline.moe.llama2c import Llama2cTokenizer, load_llama2c

    if Path(model_path).is_dir():  # a Hugging Face checkpoint directory, read offline
        from transformers import AutoTokenizer, LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(model_path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(tokenizer_path or model_path, local_files_only=True)
        return model.eval(), tok
    if tokenizer_path is None:
        raise click.UsageError("a llama2.c checkpoint needs --tokenizer tokenizer.bin")
    return load_llama2c(model_path), Llama2cTokenizer(tokenizer_path)


@cli.command()
@click.argument("model_path", type=click.Path(exists=True))
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True),
              help="llama2.c tokenizer.bin (or a Hugging Face tokenizer directory)")
@click.option("--layers", default="all", show_default=True,
              help="decoder layers to convert, 0-based, comma-separated")
@click.option("--experts", "num_experts", default=8, show_default=True)
@click.option("--top-k", "top_k", default=2, show_default=True)
@click.option("--init", "init", default="perturb", show_default=True,
              type=click.Choice(["copy", "perturb", "split", "random"]))
@click.option("--gate", "gate_type", default="topk", show_default=True,
              type=click.Choice(["topk", "switch", "noisy_topk", "hash", "random"]))
@click.option("--prompt", default="Once upon a time", show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.9, show_default=True)
@click.option("--seed", default=0, show_default=True)
def generate(model_path: str, tokenizer_path: str | None, layers: str, num_experts: int,
             top_k: int, init: str, gate_type: str, prompt: str, max_new_tokens: int,
             temperature: float, seed: int) -> None:
    """Convert a Llama (llama2.c .bin or HF directory) to MoE and generate with stats."""
    from pipeline.moe.llama import (
        convert_to_moe,
        count_active_parameters,
        count_parameters,
    )
    from pipeline.moe.llama import generate as run_generation

    dense, tok = _load_llama(model_path, tokenizer_path)
    n = len(dense.model.layers)
    chosen = list(range(n)) if layers == "all" else [int(i) for i in layers.split(",")]
    moe = convert_to_moe(dense, chosen, num_experts=num_experts,
                         top_k=1 if gate_type == "switch" else top_k,
                         expert_init_strategy=init, gate_type=gate_type, seed=seed)
    click.echo(f"converted layers {chosen} of {n}: {count_parameters(moe):,} parameters, "
               f"{count_active_parameters(moe):,} active per token")
    result = run_generation(moe, tok, prompt, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed,
                            show_expert_stats=True, show_routing_entropy=True)
    click.echo(f"{prompt}{result.text}")


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--batch-size", type=int, default=None,
              help="items per batch [default: MOE_BATCH_SIZE, 256]")
def run(file: str, batch_size: int | None) -> None:
    """Run a JSONL file of items through the pipeline, in this process (embedded default)."""
    from pipeline.inputs import read_items
    from pipeline.jobs import run_local

    total = len(read_items(file)[0])
    with click.progressbar(length=total, label="items", file=sys.stderr) as bar:
        summary = run_local(file, batch_size=batch_size, progress=bar.update)
    click.echo(f"job {summary.job_id} {summary.status}: {summary.items} items "
               f"({summary.bad_items} bad), {summary.reports} draft reports -> "
               f"{summary.inserted} new insights, {summary.merged} merged, "
               f"in {summary.seconds:.1f} s")
    click.echo(f"graph: {Settings().neo4j_uri or 'embedded (moe-pipeline status)'}; "
               f"run id {summary.run_id}")


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--batch-size", type=int, default=None,
              help="items per batch [default: MOE_BATCH_SIZE, 256]")
@click.option("--wait", is_flag=True, help="show progress until the job finishes")
@click.option("--timeout", type=float, default=None, help="seconds to wait at most")
def submit(file: str, batch_size: int | None, wait: bool, timeout: float | None) -> None:
    """Queue a JSONL file of items for the Celery workers (the stack)."""
    from pipeline import jobs
    from pipeline.storage.sql import session_factory

    settings = Settings()
    job = jobs.submit(file, settings, batch_size)
    click.echo(f"job {job.job_id} queued: {len(job.batches)} batches "
               f"(broker {settings.broker_url()}; run {job.run_id})")
    if not wait:
        click.echo(f"follow it with: moe-pipeline status {job.job_id}")
        return
    Session = session_factory(settings.sql_url(), run_migrations=False)
    total = sum(len(chunk) for _, chunk in job.batches)
    with click.progressbar(length=total, label="items", file=sys.stderr) as bar:
        seen = [0]

        def show(state: jobs.Progress) -> None:
            bar.update(state.items_done - seen[0])
            seen[0] = state.items_done

        state = jobs.wait(Session, job.job_id, timeout, on_progress=show)
    click.echo(f"job {job.job_id} {state.status}: {state.finished - state.failed}/"
               f"{state.batches} batches completed, {state.failed} failed")
    if state.status == "failed":
        raise PipelineError(f"job {job.job_id} failed; see moe-pipeline status {job.job_id}")


def _vector_file(path: str) -> list[float]:
    import json

    import numpy as np

    try:
        if path.endswith(".npy"):
            return [float(v) for v in np.load(path).reshape(-1)]
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError included
        raise PipelineError(f"{path}: not a readable vector file ({err})") from err
    if isinstance(data, dict):
        data = data.get("vector")
    if not isinstance(data, list) or not data or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in data):
        raise PipelineError(f"{path}: expected a non-empty JSON list of numbers, or "
                            f"{{\"vector\": [...]}}")
    return [float(v) for v in data]


@cli.command()
@click.option("--text", help="find insights near this text")
@click.option("--vector-file", type=click.Path(exists=True, dir_okay=False),
              help="...or near this vector (JSON list, {\"vector\": [...]}, or .npy)")
@click.option("--k", default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON lines")
@click.option("--queue/--local", "via_queue", default=None,
              help="ask a query worker, or answer here [default: the queue when "
                   "CELERY_BROKER_URL is set]")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def similar(text: str | None, vector_file: str | None, k: int, as_json: bool,
            via_queue: bool | None, timeout: float) -> None:
    """Insights most similar to a text or a vector, from the hot embedding cache."""
    import json

    if (text is None) == (vector_file is None):
        raise click.UsageError("give exactly one of --text or --vector-file")
    vector = _vector_file(vector_file) if vector_file else None
    settings = Settings()
    via_queue = bool(settings.celery_broker_url) if via_queue is None else via_queue
    message = {"text": text, "vector": vector, "k": k}
    if via_queue:
        from celery.exceptions import TimeoutError as CeleryTimeout

        from pipeline.workers.app import SIMILAR, make_app

        try:
            result = make_app(settings).send_task(SIMILAR, args=[message])
            hits = result.get(timeout=timeout)
        except CeleryTimeout as err:
            raise PipelineError(f"no answer from a query worker within {timeout:.0f} s; is "
                                "`moe-pipeline worker query` running?") from err
        except PipelineError:
            raise
        except Exception as err:  # the broker, or the worker's own error, passed on
            raise PipelineError(f"similar via {settings.broker_url()}: "
                                f"{type(err).__name__}: {err}") from err
    else:
        from pipeline.workers.app import Resources
        from pipeline.workers.query import similar_here

        res = Resources()
        try:
            hits = similar_here(res, message)
        finally:
            res.close()
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit, default=str))
        return
    if not hits:
        click.echo("(no insights yet)")
    for hit in hits:
        summary = (hit.get("summary") or ", ".join(hit.get("sources") or []))[:60]
        click.echo(f"{hit['similarity']:.3f}  {hit['shard']:<14} {hit['node_id']}  "
                   f"support={hit.get('support')}  {summary}")


WORKER_QUEUES = {"gpu": "gpu", "query": "query"}


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("kind", type=click.Choice(["gpu", "librarian", "query"]))
@click.option("--shards", help="librarian: comma-separated shards [default: every "
                               "constellation of the served model]")
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="pool processes (one per GPU for gpu workers)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--name", help="Celery node name, %h for the host [default: KIND-PID@%h]")
@click.pass_context
def worker(ctx: click.Context, kind: str, shards: str | None, concurrency: int,
           loglevel: str, name: str | None) -> None:
    """Run a Celery worker of one kind with its queues and pool (extra args go to Celery).

    Pools are prefork: each pool process loads its model or graph once, after the fork,
    so a GPU is first touched in the child, never in the parent that forks.
    """
    import os

    from pipeline import jobs
    from pipeline.workers import app as app_module

    settings = Settings()
    if kind == "librarian":
        names = (shards.split(",") if shards else
                 [name for name, _ in jobs.model_config(settings).constellation_members()])
        queues = ",".join(app_module.librarian_queue(n.strip()) for n in names if n.strip())
    else:
        queues = WORKER_QUEUES[kind]
    app_module.ROLE["kind"] = kind
    argv = ["worker", "-Q", queues, "-P", "prefork", "-c", str(concurrency),
            "--prefetch-multiplier", "1", "-n", name or f"{kind}-{os.getpid()}@%h",
            "--loglevel", loglevel, "--without-gossip", "--without-mingle", *ctx.args]
    click.echo(f"{kind} worker on queues {queues} (broker {settings.broker_url()})",
               err=True)
    app_module.app.worker_main(argv)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="also draw expert and constellation usage into this PNG")
def stats(run_id: str | None, plot_file: str | None) -> None:
    """Expert and constellation usage, routing entropy and dedup rate of a run (latest)."""
    import math

    from pipeline import jobs
    from pipeline.storage.sql import session_factory

    st = jobs.run_stats(session_factory(Settings().sql_url()), run_id)
    click.echo(f"run {st.run_id}: {st.jobs} jobs, {st.batches} batches, {st.items} items")
    click.echo(f"draft reports {st.reports}  new insights {st.new_insights}  merged "
               f"{st.merged}  dedup rate {st.dedup_rate:.1%}")
    n = max(len(st.expert_usage), 1)
    click.echo(f"routing entropy {st.routing_entropy:.3f} nats (uniform over {n} experts: "
               f"{math.log(n):.3f})  balance loss {st.balance_loss:.3f}")
    width = max([len(k) for k in [*st.expert_usage, *st.constellation_usage]] + [6])
    click.echo(f"{'expert':<{width}}  share")
    for name, share in st.expert_usage.items():
        click.echo(f"{name:<{width}}  {share:6.1%}  {'#' * round(share * 40)}")
    click.echo(f"{'constellation':<{width}}  share of reports")
    for name, share in st.constellation_usage.items():
        click.echo(f"{name:<{width}}  {share:6.1%}  {'#' * round(share * 40)}")
    if plot_file:
        _plot_stats(st, plot_file)
        click.echo(f"chart written to {plot_file}")


def _plot_stats(st, path: str) -> None:  # noqa: ANN001
    try:
        import matplotlib
    except ImportError as err:
        raise PipelineError("--plot needs matplotlib: pip install 'moe-pipeline[plot]'") \
            from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    left.bar(list(st.expert_usage), [100 * v for v in st.expert_usage.values()],
             color="#4c72b0")
    left.axhline(100 / max(len(st.expert_usage), 1), color="grey", linestyle="--",
                 label="uniform")
    left.set(title="expert usage", ylabel="% of token assignments")
    left.legend()
    left.tick_params(axis="x", rotation=45)
    right.bar(list(st.constellation_usage), [100 * v for v in st.constellation_usage.values()],
              color="#55a868")
    right.set(title="constellation usage", ylabel="% of draft reports")
    fig.suptitle(f"run {st.run_id[:12]}: entropy {st.routing_entropy:.2f} nats, "
                 f"dedup rate {st.dedup_rate:.0%}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _param(values: tuple[str, ...]) -> dict[str, object]:
    import json

    params: dict[str, object] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="--param")
        try:
            params[key] = json.loads(raw)  # numbers, lists, true/false, quoted strings
        except json.JSONDecodeError:
            params[key] = raw  # a bare string
    return params


@cli.command()
@click.argument("cypher")
@click.option("--param", "params", multiple=True, help="key=value (JSON values allowed)")
@click.option("--json", "as_json", is_flag=True, help="print JSON lines instead of a table")
@click.option("--write", is_flag=True, help="allow the query to change the graph")
def query(cypher: str, params: tuple[str, ...], as_json: bool, write: bool) -> None:
    """Run Cypher against the insight graph (read-only unless --write)."""
    import json

    from pipeline.storage.local_graph import open_graph

    with open_graph(Settings()) as graph:
        rows = graph.run_cypher(cypher, _param(params), write=write)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return
    if not rows:
        click.echo("(no rows)")
        return
    columns = list(rows[0])
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


@cli.command()
def up() -> None:
    """Start the embedded graph server (or find the running one) and print its URI."""
    from pipeline.storage.local_graph import LocalGraphServer

    settings = Settings()
    if settings.neo4j_uri:
        click.echo(f"NEO4J_URI is set ({settings.neo4j_uri}): no embedded server needed")
        return
    info = LocalGraphServer(settings.state_dir).start()
    click.echo(f"graph server up at {info.uri} (pid {info.pid}, "
               f"state {settings.state_dir.resolve() / 'graph'})")


@cli.command()
def down() -> None:
    """Stop the embedded graph server of this state dir."""
    from pipeline.storage.local_graph import LocalGraphServer

    settings = Settings()
    stopped = LocalGraphServer(settings.state_dir).stop()
    click.echo("graph server stopped" if stopped else "no graph server was running")


@cli.command()
@click.argument("job_id", required=False)
@click.option("--limit", default=10, show_default=True, help="jobs listed without JOB_ID")
def status(job_id: str | None, limit: int) -> None:
    """Where the graph and SQL are; the latest jobs, or one job's batches and errors."""
    from sqlalchemy import select

    from pipeline.storage.local_graph import LocalGraphServer
    from pipeline.storage.sql import Job, session_factory

    settings = Settings()
    if settings.neo4j_uri:
        click.echo(f"graph: {settings.neo4j_uri} (NEO4J_URI)")
    else:
        info = LocalGraphServer(settings.state_dir).running()
        click.echo(f"graph: embedded, {'up at ' + info.uri if info else 'down'}")
    click.echo(f"sql: {settings.sql_url()}")
    Session = session_factory(settings.sql_url())
    with Session() as s:
        if job_id is None:
            jobs = s.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)).all()
            for job in jobs:
                done = sum(b.status == "completed" for b in job.batches)
                click.echo(f"{job.id}  {job.status:<22} {job.submitted_items:>7} items  "
                           f"{done}/{len(job.batches)} batches  {len(job.item_errors)} bad")
            if not jobs:
                click.echo("no jobs yet")
            return
        job = s.get(Job, job_id)
        if job is None:
            raise PipelineError(f"no job {job_id!r} in {settings.sql_url()}")
        click.echo(f"job {job.id}: {job.status}, {job.submitted_items} items, run {job.run_id}"
                   + (f", error: {job.error}" if job.error else ""))
        for b in job.batches:
            m = b.metrics
            timing = " ".join(f"{k}={v:.2f}s" for k, v in b.timings.items())
            tail = (f"  reports={m.reports} new={m.new_insights} merged={m.merged}"
                    if m else "")
            click.echo(f"  batch {b.index:>4} {b.status:<10} attempts={b.attempts} "
                       f"{timing}{tail}")
        for e in job.item_errors:
            click.echo(f"  bad item line {e.line} id {e.item_id}: {e.field}: {e.message}")


def main(argv: Sequence[str] | None = None) -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError as SQLError

    try:
        cli.main(args=argv, standalone_mode=False)
    except PipelineError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except SQLError as err:
        click.echo(f"error: SQL database unreachable ({Settings().sql_url()}): "
                   f"{str(err.orig).strip().splitlines()[0] if err.orig else err}", err=True)
        sys.exit(1)
    except BrokerError as err:
        click.echo(f"error: broker unreachable ({Settings().broker_url()}): {err}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
