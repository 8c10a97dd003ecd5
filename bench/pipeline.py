"""Benchmark: items per second through the whole pipeline, this code against an earlier
commit's, and what the run ledger costs per batch.

Two trees run side by side in the same run: this checkout's ``pipeline`` package (``after``)
and the one of ``--before`` (a git ref, default the commit before the ledger pass of issue 25),
exported with ``git archive`` into a temporary directory. Each tree gets its own long-lived
process (``--serve``, with ``PYTHONPATH`` at that tree), its own state dir (SQLite file,
embedded graph server) and, for the queued way, its own Redis database and one GPU/CPU and one
librarian worker (real Celery processes, ``moe-pipeline worker``). The parent interleaves the
two trees round by round on the same fresh items, and the figures are medians.

Workloads: vectors (32 dims, topics with near-duplicates) and texts (examples/texts.jsonl,
MiniLM), each embedded (`run_local`) and queued (`submit` + `wait`). Queued items/s count from
the first message sent to the job's completion in SQL. Each tree queues on its own Redis
database (``BENCH_REDIS_URL``, default db 13, and ``BENCH_REDIS_BEFORE_URL``, default db 14)
under a key prefix of the run's own; nothing is flushed, and only the run's keys are deleted.

Per batch, on the embedded way (``--count-items`` items, ``--count-batch`` a batch): SQL
transactions (SQLAlchemy's ``after_begin``: a read session counts, it is a transaction on
the server; the job's heartbeat thread, which beats every 5 s whatever the batches, is left
out), SQL statements (``before_cursor_execute``), graph queries (the driver's ``run``, on a
session or in a transaction), graph transactions (a session's ``run`` is one, an auto-commit
transaction, and so is each ``execute_write``, ``execute_read`` and ``begin_transaction``),
the write transactions among them, and the parts curated (``Librarian.curate``), so that
graph transactions per part can be read beside them. Per batch is the difference
between a job of twice the items and one of ``--count-items``, over the batches it adds, so a
job's own rows (open, seal, outcome) fall out; ``*_per_job`` is the smaller job whole.

Usage: ``python bench/pipeline.py [--quick] [--items N] [--batch-size B] [--rounds R]
[--before REF] [--no-queued]``.
(``common`` takes bench/ off ``sys.path`` first, so this file does not shadow the package).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
# The code before the ledger pass of issue 25 ("the finishing pass"): what `after` is
# measured against unless --before names another ref.
BEFORE = "fbfbe9d"

sys.path.insert(0, os.path.dirname(HERE))
from common import emit, target  # noqa: E402

KINDS = ("vectors", "texts")
MODES = ("embedded", "queued")
COUNTED = ("sql_transactions", "sql_statements", "graph_queries", "graph_transactions",
           "graph_write_transactions", "curated_parts")


def vectors(n: int, seed: int, dim: int = 32, topics: int = 50) -> list[dict]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    return [{"id": f"v{seed}-{i}", "vector": (centres[i % topics] + 0.05 * rng.standard_normal(dim))
             .round(5).tolist()} for i in range(n)]


def texts(n: int, seed: int) -> list[dict]:
    """The example notes, each set with its own ids and a tag of its own, so that a round
    finds earlier rounds' near-duplicates (as a stream of notes would), never its own ids."""
    with open(os.path.join(ROOT, "examples", "texts.jsonl")) as f:
        notes = [json.loads(line)["text"] for line in f if line.strip()]
    return [{"id": f"t{seed}-{i}",
             "text": f"{notes[i % len(notes)]} (set {seed}.{i // len(notes)})"}
            for i in range(n)]


def workload(kind: str, n: int, seed: int) -> list[dict]:
    return vectors(n, seed) if kind == "vectors" else texts(n, seed)


# -- counting (runs in a tree's process, on whichever `pipeline` that tree has) -----------
@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """SQL transactions and statements, graph queries, transactions and write
    transactions, and parts curated, of every engine, session, driver and librarian of this
    process while the block runs."""
    from neo4j._sync.work.session import Session as GraphSession
    from neo4j._sync.work.transaction import TransactionBase
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from pipeline.librarian import Librarian

    seen: Counter = Counter()

    # The pipeline's own SQL runs on the main thread; the job's heartbeat thread beats on a
    # clock (every 5 s), so its transactions depend on how long a run takes, not on batches.
    def on_main() -> bool:
        return threading.current_thread() is threading.main_thread()

    def began(*_a: object) -> None:
        seen["sql_transactions" if on_main() else "sql_heartbeat_transactions"] += 1

    def executed(*_a: object) -> None:
        if on_main():
            seen["sql_statements"] += 1

    # A session's run is a query in an auto-commit transaction of its own; a transaction's
    # run is a query in one already counted.
    counts = {(GraphSession, "run"): ("graph_queries", "graph_transactions"),
              (TransactionBase, "run"): ("graph_queries",),
              (GraphSession, "execute_write"): ("graph_transactions",
                                                "graph_write_transactions"),
              (GraphSession, "execute_read"): ("graph_transactions",),
              (GraphSession, "begin_transaction"): ("graph_transactions",),
              (Librarian, "curate"): ("curated_parts",)}
    originals = {(cls, name): getattr(cls, name) for cls, name in counts}

    def counted(fn, keys: tuple[str, ...]):
        def wrapper(*args, **kwargs):
            for key in keys:
                seen[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    event.listen(Session, "after_begin", began)
    event.listen(Engine, "before_cursor_execute", executed)
    for (cls, name), keys in counts.items():
        setattr(cls, name, counted(originals[(cls, name)], keys))
    try:
        yield seen
    finally:
        event.remove(Session, "after_begin", began)
        event.remove(Engine, "before_cursor_execute", executed)
        for (cls, name), fn in originals.items():
            setattr(cls, name, fn)


class Tree:
    """One tree's process state: settings on its own state dir, and (queued) its workers."""

    def __init__(self, state: str, broker: str) -> None:
        from pipeline.settings import Settings

        self.env = {**os.environ, "MOE_STATE_DIR": state, "MOE_DEVICE": "cpu",
                    "DATABASE_URL": f"sqlite:///{state}/runs.sqlite3",
                    "CELERY_BROKER_URL": broker, "REDIS_URL": broker}
        self.env.pop("NEO4J_URI", None)
        self.settings = Settings(state_dir=state, device="cpu", celery_broker_url=broker,
                                 redis_url=broker, database_url=self.env["DATABASE_URL"],
                                 neo4j_uri=None)
        self.workers: list[subprocess.Popen] = []

    def start_workers(self) -> None:
        for kind in ("gpu", "librarian"):
            log = open(os.path.join(self.settings.state_dir, f"{kind}.log"), "w")  # noqa: SIM115
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker", kind, "--loglevel", "WARNING"],
                # In the state dir: `-m` puts the working directory first on sys.path, and the
                # bench's own (the checkout) would hand the older tree's workers this code.
                env=self.env, cwd=self.settings.state_dir, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))

    def close(self) -> None:
        for proc in self.workers:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def run(self, mode: str, raw: list[dict], batch_size: int) -> dict:
        from pipeline import jobs
        from pipeline.storage.sql import session_factory

        start = time.perf_counter()
        if mode == "embedded":
            summary = jobs.run_local(raw, self.settings, batch_size=batch_size)
            status, job_id = summary.status, summary.job_id
        else:
            job = jobs.submit(raw, self.settings, batch_size)
            state = jobs.wait(session_factory(self.settings.sql_url(), run_migrations=False),
                              job.job_id, timeout_s=1800, poll_s=0.05)
            status, job_id = state.status, job.job_id
        seconds = time.perf_counter() - start
        if status != "completed":
            raise RuntimeError(f"{mode} job {job_id} ended {status}")
        return {"seconds": seconds, "items_per_s": len(raw) / seconds}

    def count(self, kind: str, n: int, batch_size: int, seed: int) -> dict:
        """Per batch: the difference between a job of ``2n`` items and one of ``n``, over the
        batches it adds (the job's own open, seal and outcome fall out); per job: the job of
        ``n`` items whole."""
        runs = []
        # A first job migrates SQL, loads the model and the encoder, warms the caches: not
        # what a batch costs.
        self.run("embedded", workload(kind, batch_size, seed + 2), batch_size)
        for size, offset in ((n, 0), (2 * n, 1)):
            with counting() as seen:
                self.run("embedded", workload(kind, size, seed + offset), batch_size)
            runs.append(dict(seen))
        extra = -(-2 * n // batch_size) + (-(-n // batch_size)) * -1
        per_batch = {k: round((runs[1].get(k, 0) - runs[0].get(k, 0)) / extra, 2)
                     for k in COUNTED}
        parts = per_batch["curated_parts"]
        return {**{f"{k}_per_batch": v for k, v in per_batch.items()},
                **{f"{k}_per_job": runs[0].get(k, 0) for k in COUNTED},
                "graph_transactions_per_part": round(per_batch["graph_transactions"] / parts, 2)
                if parts else None}


def redis_keys(url: str) -> set[bytes]:
    """Every key in a Redis database (SCAN), to tell after a run which keys it created."""
    import redis

    return set(redis.Redis.from_url(url).scan_iter(count=1000))


def drop_redis_keys(url: str, prefix: str, present: set[bytes]) -> None:
    """Delete the keys under ``prefix``, and the keys an unprefixed tree created (those not
    ``present`` at the start and under no other ``moe-`` prefix)."""
    import redis

    client = redis.Redis.from_url(url)
    mine = [k for k in client.scan_iter(count=1000)
            if k.startswith(prefix.encode()) or (k not in present and not k.startswith(b"moe-"))]
    for i in range(0, len(mine), 500):
        client.unlink(*mine[i:i + 500])


def serve(state: str, broker: str) -> None:
    """A tree's process: one JSON command a line on stdin, one JSON answer a line on stdout
    (the pipeline's own output goes to stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    tree = Tree(state, broker)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "workers":
                tree.start_workers()
                answer: dict = {"ok": True}
            elif cmd["op"] == "run":
                answer = tree.run(cmd["mode"], workload(cmd["kind"], cmd["n"], cmd["seed"]),
                                  cmd["batch_size"])
            elif cmd["op"] == "count":
                answer = tree.count(cmd["kind"], cmd["n"], cmd["batch_size"], cmd["seed"])
            else:
                break
            out.write(json.dumps(answer) + "\n")
    finally:
        tree.close()


class Remote:
    """The parent's handle on one tree's process."""

    def __init__(self, name: str, pythonpath: str, broker: str, prefix: str) -> None:
        self.name, self.pythonpath = name, pythonpath
        self.state = state = tempfile.mkdtemp(prefix=f"moe-bench-pipeline-{name}-")
        self.log = open(os.path.join(state, "serve.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, HERE, "--serve", state, "--broker", broker],
            env={**os.environ, "PYTHONPATH": pythonpath, "MOE_REDIS_PREFIX": prefix},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            start_new_session=True)

    def ask(self, **cmd: object) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tree {self.name} died: see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        """Ends the tree's process (which stops its workers), then its graph server."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        # The tree's embedded graph server outlives its process, as it does for a user:
        # stopped here, so that a benchmark leaves nothing running.
        subprocess.run([sys.executable, "-m", "pipeline.cli", "down"], capture_output=True,
                       env={**os.environ, "PYTHONPATH": self.pythonpath,
                            "MOE_STATE_DIR": self.state}, timeout=120)


def close(remotes: list[Remote]) -> None:
    """Every tree closed at once: each waits on its workers' shutdown and its server's."""
    threads = [threading.Thread(target=r.close) for r in remotes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def export(ref: str) -> str:
    """The ``pipeline`` package of git ``ref``, in a temporary directory."""
    where = tempfile.mkdtemp(prefix="moe-bench-before-")
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "pipeline"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=archive, check=True)
    return where


def measure(trees: dict[str, Remote], modes: tuple[str, ...], n: int, batch_size: int,
            rounds: int, warm_up: bool = True) -> dict[str, dict[str, list[float]]]:
    """items/s of every (tree, mode, kind), the trees taking turns on the same items; each
    (mode, kind) first warmed up on every tree unless ``warm_up`` is off (--quick, whose
    figures are a smoke test, not a measurement)."""
    rates: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for mode in modes:
        for kind in KINDS:
            for tree in trees.values() if warm_up else ():  # model, encoder, caches, workers
                tree.ask(op="run", mode=mode, kind=kind, n=min(n, 64), seed=900,
                         batch_size=batch_size)
            for r in range(rounds):
                order = list(trees.items())
                for name, tree in order if r % 2 == 0 else order[::-1]:
                    got = tree.ask(op="run", mode=mode, kind=kind, n=n, seed=r,
                                   batch_size=batch_size)
                    rates[name].setdefault(f"{mode}_{kind}", []).append(got["items_per_s"])
    return rates


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--before", default=BEFORE, help="git ref of the code to compare with")
    p.add_argument("--no-queued", action="store_true", help="the embedded way only")
    p.add_argument("--count-items", type=int, default=64)
    p.add_argument("--count-batch", type=int, default=16)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--broker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.broker)
        return {}
    n = args.items or (128 if args.quick else 1024)
    rounds = args.rounds or (1 if args.quick else 3)
    modes = ("embedded",) if args.no_queued else MODES
    # Each tree's queues live under a key prefix of its own (MOE_REDIS_PREFIX), in a Redis
    # database of its own by default; nothing is flushed, and at the end only this run's keys
    # go: those under its prefixes, and (for an older tree that predates the prefix) those that
    # appeared in its database during the run.
    brokers = {"after": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
               "before": os.environ.get("BENCH_REDIS_BEFORE_URL", "redis://127.0.0.1:6379/14")}
    run = uuid.uuid4().hex[:12]
    prefixes = {name: f"moe-bench-{run}-{name}:" for name in brokers}
    present = {name: redis_keys(url) for name, url in brokers.items()}
    before_tree = export(args.before)
    trees = {"after": Remote("after", ROOT, brokers["after"], prefixes["after"]),
             "before": Remote("before", before_tree, brokers["before"], prefixes["before"])}
    try:
        counts = {name: {kind: tree.ask(op="count", kind=kind, n=args.count_items,
                                        batch_size=args.count_batch, seed=500)
                         for kind in KINDS} for name, tree in trees.items()}
        if "queued" in modes:
            for tree in trees.values():
                tree.ask(op="workers")
        rates = measure(trees, modes, n, args.batch_size, rounds, warm_up=not args.quick)
    finally:
        close(list(trees.values()))
        for name, url in brokers.items():
            drop_redis_keys(url, prefixes[name], present[name])
    med = {name: {k: round(statistics.median(v), 1) for k, v in r.items()}
           for name, r in rates.items()}
    ratios = {f"after_vs_before_{k}": med["after"][k] / med["before"][k] for k in med["after"]}
    if "queued" in modes:
        ratios["queued_vs_embedded_vectors"] = (med["after"]["queued_vectors"]
                                                / med["after"]["embedded_vectors"])
    keys = [f"{k}_per_{unit}" for unit in ("batch", "job") for k in COUNTED]
    keys.append("graph_transactions_per_part")
    per_batch = {key: {name: {kind: counts[name][kind][key] for kind in KINDS}
                       for name in counts} for key in keys}
    return emit("pipeline", torch.device("cpu"),
                {"items": n, "batch_size": args.batch_size, "rounds": rounds,
                 "before": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short",
                                           args.before], capture_output=True, text=True
                                          ).stdout.strip(),
                 "modes": list(modes), "kinds": list(KINDS),
                 "queued": "1 gpu worker (cpu here) + 1 librarian worker per tree, Redis",
                 "graph": "embedded (one server per tree)",
                 "counted_on": {"items": args.count_items, "batch_size": args.count_batch,
                                "way": "embedded"},
                 "quick": args.quick},
                results={**{f"{k}_items_per_s": v for k, v in med["after"].items()},
                         **{key: value["after"] for key, value in per_batch.items()}},
                references={**{f"before_{k}_items_per_s": v for k, v in med["before"].items()},
                            **{f"before_{key}": value["before"]
                               for key, value in per_batch.items()}},
                ratios=ratios,
                targets={"sql_transactions_per_batch": {
                    "goal": 3, "value": max(per_batch["sql_transactions_per_batch"]["after"]
                                            .values()),
                    "met": max(per_batch["sql_transactions_per_batch"]["after"].values()) <= 3},
                    "graph_transactions_per_part": {
                    "goal": 1, "value": max(per_batch["graph_transactions_per_part"]["after"]
                                            .values()),
                    "met": max(per_batch["graph_transactions_per_part"]["after"].values())
                    <= 1},
                    **{k: target(1.0, v) for k, v in ratios.items()
                       if k.startswith("after_vs_before_embedded")}},
                runs=rates)


if __name__ == "__main__":
    main()
    sys.exit(0)
