"""Peak memory and time of `moe-pipeline query` on a huge result, as a user runs it.

The query is ``UNWIND range(1, N) AS i RETURN i``: N rows from the graph server, no data
needed. Each run is the installed command in a process of its own under ``/usr/bin/time``
(its maximum resident set size, and wall time), against the graph the environment names
(``NEO4J_URI``, else the embedded server of ``MOE_STATE_DIR``, started first).

``--before DIR`` also runs the command from another checkout (an older commit, extracted with
``git archive``) on the same server, for a before/after comparison on one machine.

    python bench/query_memory.py --rows 1000000 10000000 --before /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import emit  # first: it leaves bench/ off sys.path before the package is imported

ROOT = Path(__file__).resolve().parent.parent


def _measure(code: Path, rows: int, flags: list[str], timeout_s: float) -> dict:
    """One `query` run of the package in ``code``: peak RSS (MB), seconds, lines printed."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = ["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, "-m", "pipeline.cli",
           "query", f"UNWIND range(1, {rows}) AS i RETURN i", *flags]
    start = time.monotonic()
    try:
        # cwd: `python -m` puts the current directory before PYTHONPATH on sys.path.
        proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"timed_out_s": timeout_s}
    took = time.monotonic() - start
    err = proc.stderr.decode(errors="replace")
    rss_kb = int(err.rsplit("maxrss_kb=", 1)[1].split()[0]) if "maxrss_kb=" in err else -1
    notes = [line for line in err.splitlines()
             if line and not line.startswith(("maxrss_kb=", "Command exited"))]
    return {"exit": proc.returncode, "peak_rss_mb": round(rss_kb / 1024, 1),
            "seconds": round(took, 2), "lines": proc.stdout.count(b"\n"),
            "stderr": notes[-1][:160] if notes else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--before", type=Path, help="an older checkout to run as well")
    ap.add_argument("--before-rows", type=int, nargs="+",
                    help="row counts for the older checkout [default: --rows]")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "up"], env={
        **os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    results: dict[str, dict] = {}
    for rows in args.rows:
        results[f"after_{rows}_table"] = _measure(ROOT, rows, [], args.timeout)
        results[f"after_{rows}_json"] = _measure(ROOT, rows, ["--json"], args.timeout)
    results["after_baseline_one_row"] = _measure(ROOT, 1, [], args.timeout)
    if args.before:
        for rows in args.before_rows or args.rows:
            results[f"before_{rows}_table"] = _measure(args.before, rows, [], args.timeout)
        results["before_baseline_one_row"] = _measure(args.before, 1, [], args.timeout)
    server = os.environ.get("NEO4J_URI") and "neo4j" or "embedded"
    emit("query_memory", torch.device("cpu"),
         {"query": "UNWIND range(1, N) AS i RETURN i", "server": server, "rows": args.rows,
          "before": str(args.before) if args.before else None},
         results, {}, {}, {})


if __name__ == "__main__":
    main()
