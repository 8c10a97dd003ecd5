"""The query task: `similar` answered from this process's warm cache replicas.

Each shard's cache catches up with the graph by seq before it answers, so an answer sees
every insight committed before the question arrived.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline import stages
from pipeline.workers.app import SIMILAR, Resources, app


@app.task(name=SIMILAR, ignore_result=False, acks_late=False)
def similar(message: dict[str, Any]) -> list[dict[str, Any]]:
    res = Resources.get()
    return similar_here(res, message)


def similar_here(res: Resources, message: dict[str, Any]) -> list[dict[str, Any]]:
    """``message``: ``{"vector": array (input width) | None, "text": str | None, "k": int}``."""
    system = res.system
    x = query_input(res.settings, system.config.input_dim, message.get("text"),
                    message.get("vector"), res.device)
    return stages.similar(system, res.librarian(system.config), x, int(message.get("k", 10)))


def query_input(settings, input_dim: int, text: str | None, vector: Any,  # noqa: ANN001
                device: str = "cpu") -> torch.Tensor:
    from pipeline.inputs import read_items

    if text is not None:
        raw: dict[str, Any] = {"id": "query", "text": text}
    else:
        raw = {"id": "query", "vector": [float(v) for v in vector]}
    items, bad = read_items([raw])
    if bad:
        from pipeline.errors import PipelineError

        raise PipelineError(f"query: {bad[0].field}: {bad[0].message}")
    return stages.encode(items, input_dim, settings.seed, settings.text_model, device)
