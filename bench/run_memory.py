"""Peak memory of a job's reading stage: the whole file at once (before issue 24) against a
chunk at a time, on a short and a long file.

What is measured, each in a fresh process (peak RSS, ``ru_maxrss``, imports included, and
wall time), on JSONL files of text items:

* ``whole_file``: what `moe-pipeline run` and `submit` did before: `read_items` (every item
  in memory), then `ledger.create_job` (every batch recorded in one transaction);
* ``streamed``: what they do now: `inputs.survey` (the counting pass), then
  `inputs.read_chunks` with `ledger.open_job` / `add_batch` / `seal_job` per chunk, on the
  same SQLite ledger;
* ``imports``: the same imports and nothing read (the floor of both).

Routing through the model is left out: on 2 CPU cores a million items through the encoder and
the MoE take hours, and that stage holds one batch at a time before and after (it is the
reading and the ledger that held the whole file). `submit`'s queued path is the same
reading and ledger work plus one message per batch, so these figures are its figures too.

    python bench/run_memory.py [--quick] [--lines 10000 1000000] [--state-dir DIR]

``--state-dir``: also time `settings.private_state_dir` (the start-up walk) on that dir.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# As `common` does (bench/pipeline.py would shadow the package), without importing torch:
# a measuring child imports only what the reading stage imports.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH]

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["binomial", "coefficient", "memory", "rehearsal", "vision", "edge", "filter", "verb",
         "subject", "metaphor", "integral", "derivative", "prime", "divisor", "sleep",
         "cortex", "retina", "syntax"]


def _write(path: Path, lines: int) -> None:
    """Text items of about 100 bytes each, ids unique."""
    with path.open("w") as f:
        for i in range(lines):
            words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(9))
            f.write(json.dumps({"id": f"n{i}", "text": f"Note {i}: {words}.",
                                "meta": {"k": i % 4}}) + "\n")


def _child(mode: str, path: Path, sql: str, batch_size: int) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    from pipeline.inputs import read_chunks, read_items, survey
    from pipeline.moe.config import MoEConfig
    from pipeline.storage import ledger
    from pipeline.storage.sql import session_factory

    Session = session_factory(sql)
    config = MoEConfig()  # recorded on the run only; the default model's, without torch
    start = time.perf_counter()
    items = 0
    if mode == "whole_file":
        good, bad = read_items(path)
        job = ledger.create_job(Session, good, bad, config, "local", batch_size, "cpu")
        items = len(good) + len(bad)
        del job
    elif mode == "streamed":
        found = survey(path)
        _, job_id = ledger.open_job(Session, config, "local", "cpu", found.items)
        for index, (chunk, bad) in enumerate(read_chunks(path, found, batch_size)):
            ledger.add_batch(Session, job_id, index, chunk, bad)
            items += len(chunk) + len(bad)
        ledger.seal_job(Session, job_id)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": round(peak_kb / 1024, 1), "seconds": round(seconds, 2),
            "items": items}


def _measure(mode: str, path: Path, batch_size: int, tmp: Path) -> dict[str, float]:
    sql = f"sqlite:///{tmp / f'{mode}-{path.stem}.sqlite3'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), sql,
                          str(batch_size)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout)


def _walk_ms(state_dir: Path) -> dict[str, float]:
    from pipeline.settings import private_state_dir

    files = sum(len(f) for _, _, f in os.walk(state_dir))
    start = time.perf_counter()
    fixed = private_state_dir(state_dir)
    return {"state_dir_files": files, "private_walk_ms": round(
        (time.perf_counter() - start) * 1000, 2), "modes_fixed": fixed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lines", type=int, nargs=2, default=[10_000, 1_000_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "FILE", "SQL", "BATCH"))
    args = parser.parse_args()
    if args.child:
        mode, path, sql, batch = args.child
        print(json.dumps(_child(mode, Path(path), sql, int(batch))))
        return
    short, long = (200, 5_000) if args.quick else args.lines
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for lines in (short, long):
            path = tmp / f"items{lines}.jsonl"
            _write(path, lines)
            results[f"file_mb_{lines}"] = round(path.stat().st_size / 2**20, 1)
            for mode in ("imports", "whole_file", "streamed"):
                got = _measure(mode, path, args.batch_size, tmp)
                results[f"{mode}_peak_rss_mb_{lines}"] = got["peak_rss_mb"]
                if mode != "imports":
                    results[f"{mode}_seconds_{lines}"] = got["seconds"]
    growth = {mode: results[f"{mode}_peak_rss_mb_{long}"] - results[f"{mode}_peak_rss_mb_{short}"]
              for mode in ("whole_file", "streamed")}
    per_line_kb = {f"{mode}_kb_per_extra_line": round(g * 1024 / (long - short), 4)
                   for mode, g in growth.items()}
    extra = _walk_ms(args.state_dir) if args.state_dir else {}
    sys.path.insert(0, _BENCH)
    import torch
    from common import emit

    emit("run_memory", torch.device("cpu"),
         {"lines": [short, long], "batch_size": args.batch_size, "item": "text, ~100 bytes",
          "measured": "reading + validation + SQLite ledger, no model (see the docstring)"},
         {**results, **per_line_kb, **extra},
         {"whole_file_peak_rss_mb": results[f"whole_file_peak_rss_mb_{long}"]},
         {"streamed_vs_whole_file_peak_long": results[f"streamed_peak_rss_mb_{long}"]
          / results[f"whole_file_peak_rss_mb_{long}"]},
         {})


if __name__ == "__main__":
    main()
