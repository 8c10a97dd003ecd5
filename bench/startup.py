"""Benchmark: how long the commands that need no model take to answer, end to end.

``moe-pipeline --help``, ``--version``, ``status``, ``query`` (against a running embedded
server) and ``down`` (with none running) are each run as a fresh process, N times in
interleaved rounds; the median wall time of each is compared with the cost of importing
torch alone in a fresh interpreter, measured in the same rounds (the import those commands
avoid). Goal: each under one second.

Usage: ``python bench/startup.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # for the device record only
from common import emit

CLI = [sys.executable, "-m", "pipeline.cli"]


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed: {proc.stderr[-500:]}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rounds = 2 if args.quick else 7
    with tempfile.TemporaryDirectory(prefix="moe-startup-") as state:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NEO4J_URI", "MOE_NEO4J_URI", "DATABASE_URL", "MOE_DATABASE_URL")}
        env["MOE_STATE_DIR"] = state
        commands = {"help": CLI + ["--help"], "version": CLI + ["--version"],
                    "status": CLI + ["status"], "down": CLI + ["down"]}
        wall(CLI + ["status"], env)  # creates the SQLite file once, as a first run would
        times: dict[str, list[float]] = {name: [] for name in [*commands, "query"]}
        times["import_torch"] = []
        subprocess.run(CLI + ["up"], env=env, capture_output=True, timeout=300, check=True)
        try:
            for _ in range(rounds):
                for name, cmd in commands.items():
                    if name != "down":
                        times[name].append(wall(cmd, env))
                times["query"].append(wall(CLI + ["query", "RETURN 1 AS one"], env))
                times["import_torch"].append(wall([sys.executable, "-c", "import torch"], env))
        finally:
            subprocess.run(CLI + ["down"], env=env, capture_output=True, timeout=120)
        for _ in range(rounds):  # with no server running: nothing to stop
            times["down"].append(wall(commands["down"], env))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    results = {f"{name}_seconds": round(med[name], 3) for name in [*commands, "query"]}
    references = {"import_torch_seconds": round(med["import_torch"], 3)}
    ratios = {f"{name}_vs_import_torch": med[name] / med["import_torch"]
              for name in [*commands, "query"]}
    # Goals are upper bounds here: the value must stay below them.
    targets = {f"{name}_seconds": {"goal": 1.0, "bound": "max", "value": round(med[name], 3),
                                   "met": med[name] < 1.0} for name in [*commands, "query"]}
    return emit("startup", torch.device("cpu"), {"rounds": rounds, "quick": args.quick},
                results, references, ratios, targets)


if __name__ == "__main__":
    main()
