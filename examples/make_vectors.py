"""Write a JSONL file of vector items with planted near-duplicates (for `moe-pipeline run`).

    python examples/make_vectors.py examples/vectors.jsonl --items 300 --dim 32
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--topics", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    topics = rng.standard_normal((args.topics, args.dim))
    with open(args.out, "w") as f:
        for i in range(args.items):
            t = int(rng.integers(args.topics))
            v = topics[t] + 0.05 * rng.standard_normal(args.dim)  # near-duplicates of a topic
            f.write(json.dumps({"id": f"doc-{i:04d}", "vector": [round(float(x), 5) for x in v],
                                "meta": {"topic": t}}) + "\n")


if __name__ == "__main__":
    main()
