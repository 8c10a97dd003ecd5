"""The hot embedding cache: one shard's insight embeddings on the device, for fast top-k.

Legend: N cached rows, Q queries, D embedding dim, K results per query, C candidates per
query (K and a margin), R rows in one tile of the scan.

A preallocated ``(capacity, D)`` tensor grows by doubling (never per insert); ids, seqs and
support counts sit beside it on the host. Rows are L2-normalised on insert and kept in
float32: these are the cache's values (the graph's float16 embeddings are exact in float32),
what `embeddings` returns and what snapshots hold. The graph is the source of truth: `warm`
loads a shard, `catch_up` adds rows with ``seq > watermark``, and `save`/`load` snapshot the
cache so a restart need not re-read every insight through Cypher. Each row keeps its
insight's summary too, for the librarian's lexical comparison. A cache may hold one model's
insights of a shard only (``model``): its watermark still follows the whole shard's seq,
which is what the graph write's fence checks.

`search` is exact, a brute-force scan, with no host sync until the caller reads the result.
The scan runs in `scan_dtype`: float16 on CUDA, bfloat16 on CPUs with AMX tiles, float32 on
other CPUs (AVX2 alone, or AVX512-BF16 without AMX, where a bfloat16 scan ran slower). A
narrow scan reads its own copy of the rows and keeps C = K + `MARGIN` candidates per query;
those are scored again in float32 from the float32 rows, and their top K, with float32
scores, are the answer.

"Exact" means the top K by float32 inner product over the float32 rows: what FAISS
``IndexFlatIP`` returns when given the same rows, up to the last bit of a float32 sum (so
scores within an ulp may swap). It holds when the true top K are among the scan's top C.
Rounding the inputs moves a narrow score by about 2e-4 in bfloat16 (std, 384 dims, near a
score of 1) and 3e-5 in float16, while planted near-duplicates' scores lie 2e-4 apart: alone,
a float16 scan gave FAISS's top 10 on 73-75% of clustered queries (on a GPU) and a bfloat16
one on 37%; with the re-rank bfloat16 gives 100% (`bench/similarity.py`), as does float16 in
a CPU emulation of the GPU's rounding. The price is memory: the scan copy
takes 2 bytes per dim per row beside the float32 rows' 4 (1M x 384: 0.77 GB beside 1.54 GB),
on the device; a float32 scan has no copy.
"""

from __future__ import annotations

import functools
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

from pipeline.moe.cpu import cpu_linear, onednn_available, onednn_dtypes


class ShardReader(Protocol):
    """What the cache needs from the graph (`GraphStore` provides it)."""

    def read_shard(self, shard: str, dim: int, after: int = -1, page: int = 5000,
                   model: str | None = None): ...


def _as_tensor(x: Tensor | np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device=device, dtype=torch.float32)


# Candidates beyond K that a narrow scan hands to the float32 re-rank. On bench/similarity.py's
# clustered set (100k x 384, each query's top 10 within 2e-4) a bfloat16 scan held all of the
# exact top 10 among its top 16 on 99.3% of 1,024 queries and among its top 20 on 100%. 14
# (top 24) cost 5-11% of a search on 2 cores of a Xeon with AMX, 24 cost 13-40%. Clusters 3x
# tighter need more for bfloat16 (top 24: 93%, top 34: 99.8%); float16 is 8x finer, and a
# float32 scan needs none.
MARGIN = 14
# (queries per chunk, scores per tile) by device and scan dtype. On the CPU tiles stay under
# 32 MiB, which glibc's allocator recycles instead of page-faulting in afresh (float32 at
# 2^25 scores: 2,250 against 3,700 queries/s at 2^22); 256 queries a chunk measured fastest
# on the Xeon for both dtypes (against 128, 512 and 1,024), the GEMM being slower below and
# the top-k of wider tiles cheaper per score.
TILING = {("cpu", torch.bfloat16): (256, 1 << 23), ("cpu", torch.float32): (256, 1 << 22),
          ("cuda", torch.float16): (512, 1 << 28), ("cuda", torch.float32): (512, 1 << 28)}
# Strided groups whose maxima prune a CPU tile before its top-k (see `_tile_top`): 8 measured
# faster than 4 or 16 on 32,768-row tiles.
GROUPS = 8


@functools.cache
def _amx_bf16_cpu() -> bool:
    """Whether oneDNN multiplies bfloat16 on this CPU's AMX tiles. Only there does a bfloat16
    scan pay: on a Xeon with AMX, scan and re-rank ran 2.1-3.0x FAISS where a float32 scan ran
    0.8-0.9x; with oneDNN held to AVX512-BF16 (``ONEDNN_MAX_CPU_ISA``, as on an EPYC of Zen 4)
    they ran 0.61x where float32 ran 0.89x. On AVX2 alone oneDNN has no bfloat16 kernel."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return amx and onednn_available() and torch.bfloat16 in onednn_dtypes()


def scan_dtype(device: torch.device) -> torch.dtype:
    """The dtype a cache on ``device`` scans in by default (decided by what the device has)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and _amx_bf16_cpu() else torch.float32


def _tile_scores(q_QD: Tensor, rows_RD: Tensor, shift_R: Tensor | None) -> Tensor:
    """``q @ rows^T`` in the scan dtype, ``(Q, R)``; plus ``shift_R`` (all -1) if given.

    A narrow scan is shifted by -1 inside the GEMM, where the bias is added to the float32
    accumulator before the one rounding to the output dtype: a score near 1, where
    near-duplicates sit, is then rounded at the resolution of its distance from 1 (bfloat16:
    steps of 6e-5 at 0.99, 8e-6 at 0.999, against 4e-3 unshifted). On the CPU by oneDNN (twice
    MKL's float32 rate on AMD here; bfloat16 on AMX tiles), else by the default kernels.
    """
    if q_QD.device.type == "cpu" and onednn_available() and q_QD.dtype in onednn_dtypes():
        if shift_R is None:
            return cpu_linear(q_QD, rows_RD)
        return torch.ops.mkldnn._linear_pointwise(q_QD, rows_RD, shift_R, "none", [], "")
    if shift_R is None:
        return q_QD @ rows_RD.t()
    return torch.addmm(shift_R, q_QD, rows_RD.t())


def _tile_top(s_QR: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """The top ``c`` scores of each row of a tile and their columns, ``(Q, c)`` each, unsorted.

    On the CPU a wide tile is pruned first. Split a row's columns into G groups: its top c
    lie in at most c groups, and those are among the c groups with the highest maxima (a
    group outside them is beaten by c other maxima, c scores at least its best; with ties,
    the chosen groups still hold c scores at least the c-th best maximum, so the same
    values). Groups are strided (columns j, j + R/G, ...), so their maxima are G - 1
    elementwise maxima of contiguous slices, and the top c maxima are found the same way,
    recursively: top-ks over a few hundred maxima of maxima and over c * G gathered values
    replace one over R. CPU top-k is a partial sort per row, several times the cost of the
    maxima.
    """
    q, r = s_QR.shape
    if s_QR.device.type != "cpu" or r % GROUPS or r < 4 * GROUPS * c:
        return torch.topk(s_QR, c, dim=1, sorted=False)
    width = r // GROUPS
    _, groups_Qc = _tile_top(s_QR.view(q, GROUPS, width).amax(1), c)
    cols = (groups_Qc.unsqueeze(2)
            + torch.arange(0, r, width, device=s_QR.device)).view(q, c * GROUPS)
    s_Qc, j = torch.topk(s_QR.gather(1, cols), c, dim=1, sorted=False)
    return s_Qc, cols.gather(1, j)


def _rerank(q_QD: Tensor, rows_ND: Tensor, cand_QC: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` of each query's candidates by float32 score: ``scores, rows (Q, K)``."""
    rows_QCD = rows_ND.index_select(0, cand_QC.reshape(-1)).view(*cand_QC.shape, -1)
    if q_QD.device.type == "cpu":
        # (1, D) x (D, C) per query: half the time of (C, D) x (D, 1) in MKL's batched GEMM.
        s_QC = torch.bmm(q_QD.unsqueeze(1), rows_QCD.transpose(1, 2)).squeeze(1)
    else:  # products and a sum, never TF32, whatever torch.backends.cuda.matmul allows
        s_QC = (rows_QCD * q_QD.unsqueeze(1)).sum(-1)
    s_QK, j = torch.topk(s_QC, k, dim=1)
    return s_QK, cand_QC.gather(1, j)


class EmbeddingCache:
    """Top-k cosine search over one shard's insights.

    ``dtype`` is the scan's dtype (default `scan_dtype` of the device); float32 scans the
    float32 rows themselves, with no second copy and no re-rank.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, capacity: int = 1024,
                 max_rows: int | None = None) -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype or scan_dtype(self.device)
        self.max_rows = max_rows
        self._emb, self._scan = self._buffers(max(1, capacity))
        self.ids: list[str] = []
        self.texts: list[str] = []  # each row's insight summary ("" where none)
        self._seqs = np.empty(0, dtype=np.int64)
        self._support = np.empty(0, dtype=np.int64)
        self.watermark = -1  # highest seq ever added (evicted rows included)
        self.updates = 0  # rows added since creation, for snapshot intervals
        # The shard's forget count when last read (None: never read): a catch-up that finds
        # another count reads the shard anew, as a forget removed or changed rows.
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self._emb.shape[0]

    @property
    def embeddings(self) -> Tensor:
        """The filled rows, ``(N, D)`` float32 (as added, normalised)."""
        return self._emb[: len(self)]

    @property
    def seqs(self) -> np.ndarray:
        return self._seqs

    def _buffers(self, capacity: int) -> tuple[Tensor, Tensor]:
        """The float32 rows ``(capacity, D)`` and the scan's copy (the same tensor when the
        scan is float32)."""
        rows = torch.empty(capacity, self.dim, dtype=torch.float32, device=self.device)
        if self.dtype == torch.float32:
            return rows, rows
        return rows, torch.empty(capacity, self.dim, dtype=self.dtype, device=self.device)

    def _put(self, start: int, rows_ND: Tensor) -> None:
        """Write float32 unit rows at ``start`` (and their scan copy)."""
        self._emb[start: start + len(rows_ND)] = rows_ND
        if self._scan is not self._emb:
            self._scan[start: start + len(rows_ND)] = rows_ND.to(self.dtype)

    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        capacity = self.capacity
        while capacity < rows:
            capacity *= 2
        # Filled before they are published: a search running meanwhile sees old or new rows,
        # never empty ones.
        n = len(self)
        emb, scan = self._buffers(capacity)
        emb[:n] = self._emb[:n]
        if scan is not emb:
            scan[:n] = self._scan[:n]
        self._emb, self._scan = emb, scan

    def add(self, ids: Sequence[str], embeddings: Tensor | np.ndarray, seqs: Sequence[int],
            support: Sequence[int] | np.ndarray | None = None,
            texts: Sequence[str] | None = None) -> None:
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
        self._put(start, torch.nn.functional.normalize(emb, dim=-1))
        self.ids.extend(ids)
        self.texts.extend(t or "" for t in texts)
        self._seqs = np.concatenate([self._seqs, seq_arr])
        self._support = np.concatenate([self._support, np.ones(n, np.int64) if support is None
                                        else np.asarray(support, np.int64)])
        self.watermark = max(self.watermark, int(seq_arr.max()))
        self.updates += n
        if self.max_rows is not None and len(self) > self.max_rows:
            self.evict(len(self) - self.max_rows)

    def add_support(self, rows: Sequence[int] | np.ndarray,
                    counts: Sequence[int] | int = 1) -> None:
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
        self._put(0, self.embeddings.index_select(0, kept))
        evicted = [self.ids[i] for i in gone]
        self.ids = [self.ids[i] for i in keep]
        self.texts = [self.texts[i] for i in keep]
        self._seqs, self._support = self._seqs[keep], self._support[keep]
        return evicted

    def search(self, queries: Tensor | np.ndarray, k: int, query_chunk: int | None = None,
               score_budget: int | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` cosine similarities of each query: ``(Q, D) -> scores, rows (Q, K)``.

        Scores are float32, best first; rows index `ids`; ``K = min(k, N)``. Exact (see the
        module docstring): a brute-force scan, and a float32 re-rank when the scan is narrow.
        Chunked over queries (``query_chunk`` at a time) and rows so that at most
        ``score_budget`` scores (and as many floats of re-rank candidates) exist at a time,
        whatever the sizes; the defaults are `TILING`'s for the device and scan dtype.
        """
        return self._top(queries, k, True, query_chunk, score_budget)

    def scan(self, queries: Tensor | np.ndarray, k: int, query_chunk: int | None = None,
             score_budget: int | None = None) -> tuple[Tensor, Tensor]:
        """The scan's own top-``k``, without the re-rank: what a narrow dtype alone finds
        (order among near-ties is lost; scores are its rounded ones, as float32). For
        measuring what the re-rank costs and buys; `search` is the answer."""
        return self._top(queries, k, False, query_chunk, score_budget)

    @torch.no_grad()
    def _top(self, queries: Tensor | np.ndarray, k: int, rerank: bool,
             query_chunk: int | None, score_budget: int | None) -> tuple[Tensor, Tensor]:
        tiling = TILING.get((self.device.type, self.dtype), (512, 1 << 22))
        query_chunk, score_budget = query_chunk or tiling[0], score_budget or tiling[1]
        q_QD = torch.nn.functional.normalize(
            _as_tensor(queries, self.device).reshape(-1, self.dim), dim=-1)
        n, k = len(self), min(k, len(self))
        narrow = self._scan is not self._emb
        c = min(n, k + MARGIN) if narrow and rerank else k
        scores = torch.empty(q_QD.shape[0], k, dtype=torch.float32, device=self.device)
        rows = torch.empty(q_QD.shape[0], k, dtype=torch.int64, device=self.device)
        if k == 0 or q_QD.shape[0] == 0:
            return scores, rows
        row_chunk = max(c, score_budget // min(query_chunk, q_QD.shape[0]))
        for qs in range(0, q_QD.shape[0], query_chunk):
            q_chunk = q_QD[qs: qs + query_chunk]
            s_QC, i_QC = self._candidates(q_chunk.to(self.dtype), c, row_chunk)
            if narrow and rerank:
                # The re-rank gathers (Q, C, D) floats: sub-chunks keep them in the budget.
                step = max(1, score_budget // (c * self.dim))
                parts = [_rerank(q_chunk[j: j + step], self._emb, i_QC[j: j + step], k)
                         for j in range(0, len(q_chunk), step)]
                s_QK, i_QK = (torch.cat(t) for t in zip(*parts, strict=True))
            else:
                s_QK, j = torch.topk(s_QC, k, dim=1)
                s_QK, i_QK = s_QK.float() + (1 if narrow else 0), i_QC.gather(1, j)
            scores[qs: qs + len(q_chunk)], rows[qs: qs + len(q_chunk)] = s_QK, i_QK
        return scores, rows

    def _candidates(self, q_QD: Tensor, c: int, row_chunk: int) -> tuple[Tensor, Tensor]:
        """The scan's top ``c`` for a chunk of queries (in the scan dtype): scores (shifted
        by -1 when narrow) and rows, ``(Q, C)`` each, unsorted; ``row_chunk`` rows a tile."""
        n = len(self)
        shift_R = (None if self._scan is self._emb else
                   torch.full((min(n, row_chunk),), -1.0, dtype=self.dtype, device=self.device))
        tops, cols = [], []
        for rs in range(0, n, row_chunk):
            re = min(n, rs + row_chunk)
            sims = _tile_scores(q_QD, self._scan[rs:re],
                                None if shift_R is None else shift_R[: re - rs])
            s, i = _tile_top(sims, min(c, re - rs))
            tops.append(s)
            cols.append(i.add_(rs))
        s_QC, i_QC = torch.cat(tops, 1), torch.cat(cols, 1)
        if s_QC.shape[1] > c:  # several tiles: the best c of their candidates
            s_QC, j = torch.topk(s_QC, c, dim=1, sorted=False)
            i_QC = i_QC.gather(1, j)
        return s_QC, i_QC

    def ids_at(self, rows: Tensor) -> list[list[str]]:
        """Ids for the row indices `search` returned (reads them back to the host)."""
        return [[self.ids[i] for i in r] for r in rows.cpu().tolist()]

    # -- the graph and snapshots -----------------------------------------------------------
    def warm(self, graph: ShardReader, shard: str, model: str | None = None) -> int:
        """Replace the contents with the shard's insights (of ``model`` only, if given);
        returns the row count."""
        self._clear()
        return self.catch_up(graph, shard, model)

    def _clear(self) -> None:
        self.ids, self.texts = [], []
        self._seqs, self._support = np.empty(0, np.int64), np.empty(0, np.int64)
        self.watermark, self.epoch = -1, None

    def catch_up(self, graph: ShardReader, shard: str, model: str | None = None) -> int:
        """Add the shard's insights with ``seq > watermark`` (of ``model`` only, if given);
        returns how many. The watermark moves to the shard's top seq either way.

        If a forget touched the shard since the last read (its forget count moved), the
        cache is emptied and the whole shard read again: removed rows go, re-represented
        ones come back with their new embedding and text."""
        fresh = graph.read_shard(shard, self.dim, after=self.watermark, model=model)
        if self.epoch is not None and fresh.epoch != self.epoch:
            self._clear()
            fresh = graph.read_shard(shard, self.dim, after=-1, model=model)
        self.epoch = fresh.epoch
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
            {"dim": self.dim, "watermark": self.watermark, "rows": len(self),
             "epoch": self.epoch}))
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
        # float32 since this release; float16 in older snapshots of GPU caches.
        cache._put(0, tensors["embeddings"].to(device=cache.device, dtype=torch.float32))
        cache.ids = ids
        texts_file = path / "texts.json"  # absent from snapshots of older releases
        cache.texts = json.loads(texts_file.read_text()) if texts_file.exists() else [""] * n
        cache._seqs = tensors["seqs"].numpy().copy()
        cache._support = tensors["support"].numpy().copy()
        cache.watermark = meta["watermark"]
        # Snapshots from before forgetting existed hold a shard no forget had touched.
        cache.epoch = meta.get("epoch", 0)
        return cache
