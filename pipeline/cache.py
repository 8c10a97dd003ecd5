"""The hot embedding cache: one shard's insight embeddings on the device, for fast top-k.

Legend: N cached rows, Q queries, D embedding dim, K results per query.

A preallocated ``(capacity, D)`` tensor grows by doubling (never per insert); ids, seqs and
support counts sit beside it on the host. Rows are L2-normalised on insert, so a search is
one matmul and one top-k per chunk of rows (cosine similarity), exact (brute force), with no
host sync until the caller reads the result. fp16 on CUDA (half the bytes to scan), fp32 on
the CPU (where fp16 matmuls are slow). The graph is the source of truth: `warm` loads a shard,
`catch_up` adds rows with ``seq > watermark``, and `save`/`load` snapshot the cache so a
restart need not re-read every insight through Cypher. Each row keeps its insight's summary
too, for the librarian's lexical comparison. A cache may hold one model's insights of a
shard only (``model``): its watermark still follows the whole shard's seq, which is what the
graph write's fence checks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.moe.grouped_mm import cpu_linear


class ShardReader(Protocol):
    """What the cache needs from the graph (`GraphStore` provides it)."""

    def read_shard(self, shard: str, dim: int, after: int = -1, page: int = 5000,
                   model: str | None = None): ...


def _as_tensor(x: Tensor | np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device=device, dtype=torch.float32)


def _scores(q_QD: Tensor, rows_ND: Tensor) -> Tensor:
    """``q @ rows^T`` in float32; on the CPU by oneDNN, twice MKL's rate on AMD here."""
    if q_QD.device.type == "cpu":
        return cpu_linear(q_QD, rows_ND).float()
    return (q_QD @ rows_ND.t()).float()


class EmbeddingCache:
    """Top-k cosine search over one shard's insights."""

    def __init__(self, dim: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, capacity: int = 1024,
                 max_rows: int | None = None) -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.max_rows = max_rows
        self._emb = torch.empty(max(1, capacity), dim, dtype=self.dtype, device=self.device)
        self.ids: list[str] = []
        self.texts: list[str] = []  # each row's insight summary ("" where none)
        self._seqs = np.empty(0, dtype=np.int64)
        self._support = np.empty(0, dtype=np.int64)
        self.watermark = -1  # highest seq ever added (evicted rows included)
        self.updates = 0  # rows added since creation, for snapshot intervals

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self._emb.shape[0]

    @property
    def embeddings(self) -> Tensor:
        """The filled rows, ``(N, D)``."""
        return self._emb[: len(self)]

    @property
    def seqs(self) -> np.ndarray:
        return self._seqs

    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        capacity = self.capacity
        while capacity < rows:
            capacity *= 2
        grown = torch.empty(capacity, self.dim, dtype=self.dtype, device=self.device)
        grown[: len(self)] = self.embeddings
        self._emb = grown

    def add(self, ids: Sequence[str], embeddings: Tensor | np.ndarray, seqs: Sequence[int],
            support: Sequence[int] | None = None, texts: Sequence[str] | None = None) -> None:
        """Append rows (normalised here); ``support`` counts default to 1, ``texts`` to "".

        Rows whose seq is not above the watermark are already here (or were evicted) and are
        skipped, so a catch-up that races a writer's own append adds nothing twice.
        """
        seq_arr = np.asarray(seqs, dtype=np.int64)
        fresh = seq_arr > self.watermark
        texts = [""] * len(ids) if texts is None else list(texts)
        if len(ids) and not fresh.all():
            ids = [i for i, keep in zip(ids, fresh, strict=True) if keep]
            texts = [t for t, keep in zip(texts, fresh, strict=True) if keep]
            embeddings = embeddings[torch.from_numpy(fresh) if isinstance(embeddings, Tensor)
                                    else fresh]
            support = None if support is None else np.asarray(support)[fresh]
            seq_arr = seq_arr[fresh]
        n = len(ids)
        if n == 0:
            return
        emb = _as_tensor(embeddings, self.device)
        if emb.shape != (n, self.dim):
            raise ValueError(f"embeddings have shape {tuple(emb.shape)}, expected ({n}, "
                             f"{self.dim})")
        start = len(self)
        self._reserve(start + n)
        self._emb[start: start + n] = torch.nn.functional.normalize(emb, dim=-1).to(self.dtype)
        self.ids.extend(ids)
        self.texts.extend(t or "" for t in texts)
        self._seqs = np.concatenate([self._seqs, seq_arr])
        self._support = np.concatenate([self._support, np.ones(n, np.int64) if support is None
                                        else np.asarray(support, np.int64)])
        self.watermark = max(self.watermark, int(seq_arr.max()))
        self.updates += n
        if self.max_rows is not None and len(self) > self.max_rows:
            self.evict(len(self) - self.max_rows)

    def add_support(self, rows: Sequence[int], counts: Sequence[int] | int = 1) -> None:
        """More reports merged into these rows (what eviction ranks by)."""
        np.add.at(self._support, np.asarray(rows, np.int64), counts)

    def evict(self, n: int) -> list[str]:
        """Drop the ``n`` least-supported rows, oldest (lowest seq) first; return their ids.

        They stay in the graph; the watermark is unchanged, so catch-up never re-adds them.
        """
        order = np.lexsort((self._seqs, self._support))  # support, then seq, ascending
        gone = np.sort(order[:n])
        keep = np.setdiff1d(np.arange(len(self)), gone, assume_unique=True)
        kept = torch.from_numpy(keep).to(self.device)
        self._emb[: len(keep)] = self.embeddings.index_select(0, kept)
        evicted = [self.ids[i] for i in gone]
        self.ids = [self.ids[i] for i in keep]
        self.texts = [self.texts[i] for i in keep]
        self._seqs, self._support = self._seqs[keep], self._support[keep]
        return evicted

    @torch.no_grad()
    def search(self, queries: Tensor | np.ndarray, k: int, query_chunk: int = 512,
               score_budget: int | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` cosine similarities of each query: ``(Q, D) -> scores, rows (Q, K)``.

        Scores are float32, rows index `ids`; ``K = min(k, N)``. Chunked over queries and
        rows so that at most ``score_budget`` scores exist at a time, whatever the sizes.
        Exact: a brute-force scan. The default budget is 2^22 scores (16 MiB) on the CPU,
        where blocks that small are recycled by the allocator instead of page-faulted in
        afresh (measured here: 3,700 against 2,250 queries/s at 2^25), and 2^28 on a GPU.
        """
        if score_budget is None:
            score_budget = 1 << 28 if self.device.type == "cuda" else 1 << 22
        q = _as_tensor(queries, self.device)
        q = torch.nn.functional.normalize(q.reshape(-1, self.dim), dim=-1).to(self.dtype)
        n, k = len(self), min(k, len(self))
        row_chunk = max(k, 1, score_budget // max(1, min(query_chunk, q.shape[0])))
        scores = torch.empty(q.shape[0], k, dtype=torch.float32, device=self.device)
        rows = torch.empty(q.shape[0], k, dtype=torch.int64, device=self.device)
        if k == 0:
            return scores, rows
        for qs in range(0, q.shape[0], query_chunk):
            block = q[qs: qs + query_chunk]
            best_s = best_i = None
            for rs in range(0, n, row_chunk):
                sims = _scores(block, self._emb[rs: min(n, rs + row_chunk)])
                s, i = torch.topk(sims, min(k, sims.shape[1]), dim=1)
                i += rs
                if best_s is not None:
                    s, j = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
                    i = torch.cat([best_i, i], 1).gather(1, j)
                best_s, best_i = s, i
            scores[qs: qs + block.shape[0]], rows[qs: qs + block.shape[0]] = best_s, best_i
        return scores, rows

    def ids_at(self, rows: Tensor) -> list[list[str]]:
        """Ids for the row indices `search` returned (reads them back to the host)."""
        return [[self.ids[i] for i in r] for r in rows.cpu().tolist()]

    # -- the graph and snapshots -----------------------------------------------------------
    def warm(self, graph: ShardReader, shard: str, model: str | None = None) -> int:
        """Replace the contents with the shard's insights (of ``model`` only, if given);
        returns the row count."""
        self.ids, self.texts = [], []
        self._seqs, self._support = np.empty(0, np.int64), np.empty(0, np.int64)
        self.watermark = -1
        return self.catch_up(graph, shard, model)

    def catch_up(self, graph: ShardReader, shard: str, model: str | None = None) -> int:
        """Add the shard's insights with ``seq > watermark`` (of ``model`` only, if given);
        returns how many. The watermark moves to the shard's top seq either way."""
        fresh = graph.read_shard(shard, self.dim, after=self.watermark, model=model)
        self.add(fresh.ids, fresh.embeddings.astype(np.float32), fresh.seqs,
                 texts=fresh.summaries)
        self.watermark = max(self.watermark, fresh.top)
        return len(fresh.ids)

    def save(self, path: str | Path) -> Path:
        """Snapshot rows, ids, seqs, support and watermark into directory ``path``.

        Written to a sibling directory first and swapped in by renames, so a crash leaves
        either the old snapshot or the new one, never a mix.
        """
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._write_snapshot(tmp)
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def _write_snapshot(self, path: Path) -> None:
        save_file({"embeddings": self.embeddings.contiguous().cpu(),
                   "seqs": torch.from_numpy(self._seqs.copy()),
                   "support": torch.from_numpy(self._support.copy())},
                  str(path / "cache.safetensors"))
        (path / "cache.json").write_text(json.dumps(
            {"dim": self.dim, "watermark": self.watermark, "rows": len(self)}))
        # Ids one per line: splitting text reads a million of them several times faster
        # than parsing a JSON list.
        (path / "ids.txt").write_text("\n".join(self.ids))
        (path / "texts.json").write_text(json.dumps(self.texts))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, max_rows: int | None = None) -> EmbeddingCache:
        """A cache from a snapshot; `catch_up` then brings it level with the graph."""
        path = Path(path)
        meta = json.loads((path / "cache.json").read_text())
        n = meta["rows"]
        ids = (path / "ids.txt").read_text().split("\n") if n else []
        if len(ids) != n:
            raise ValueError(f"snapshot {path}: {len(ids)} ids for {n} rows")
        tensors = load_file(str(path / "cache.safetensors"))
        shape = tuple(tensors["embeddings"].shape)
        if shape != (n, meta["dim"]) or len(tensors["seqs"]) != n or len(tensors["support"]) != n:
            raise ValueError(f"snapshot {path}: embeddings {shape}, {len(tensors['seqs'])} seqs "
                             f"and {len(tensors['support'])} support counts for {n} rows")
        # Headroom for the catch-up that follows, so it does not double a large buffer.
        cache = cls(meta["dim"], device, dtype, capacity=max(1024, n + n // 8),
                    max_rows=max_rows)
        cache._emb[:n] = tensors["embeddings"].to(device=cache.device, dtype=cache.dtype)
        cache.ids = ids
        texts_file = path / "texts.json"  # absent from snapshots of older releases
        cache.texts = json.loads(texts_file.read_text()) if texts_file.exists() else [""] * n
        cache._seqs = tensors["seqs"].numpy().copy()
        cache._support = tensors["support"].numpy().copy()
        cache.watermark = meta["watermark"]
        return cache
