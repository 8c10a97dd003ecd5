"""The CPU's expert products: which kernel runs each one, packed weights, and lanes.

Legend: E experts, I a layer's input width, O its output width, n one expert's rows.

Everything the CPU path decides by measurement lives here, so one file holds the machine's
choices: oneDNN's fused linear against MKL (`cpu_linear`, `mkl_preferred`), oneDNN's blocked
layouts of bf16 weights (`packed_weights`), the per-forward state of the split dispatch
(`ExpertSlices`), and one-thread lanes that run experts side by side from a shared queue
(`cpu_lanes`, `run_in_lanes`). `dispatch._dropless_split` is the one caller of the last two.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.moe.grouped_mm import activation_, activation_fn

# Activation names as oneDNN's fused linear epilogue spells them: (attr, algorithm).
_ONEDNN_ACT = {
    None: ("none", ""),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
}


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN's fused linear kernel can be called (x86 builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's linear takes on this CPU: bf16 needs AVX-512 (or AMX) support,
    and without it the kernel refuses to build (seen on an AVX2-only EPYC)."""
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


@functools.cache
def _cpu_vendor() -> str:
    """``vendor_id`` from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), "" if unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("vendor_id")), "")
    except OSError:
        return ""


@functools.cache
def mkl_preferred() -> bool:
    """Whether large fp32 products go to MKL (``F.linear``) rather than oneDNN.

    MKL takes its AVX-512 kernels only on Intel CPUs, so the vendor decides, at run time
    (on an AMD EPYC MKL ran at half oneDNN's rate). See `MKL_MIN_ROWS` for "large".
    """
    return torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel"


# Rows from which MKL beats oneDNN where `mkl_preferred`. Measured on an Intel Xeon (AVX-512,
# 2 cores), the gated seed layer's experts without autograd: at 192 rows per expert
# (2,048 tokens) oneDNN took 142 ms and MKL 155; at 384 rows MKL 266 and oneDNN 277; at 768
# rows (8,192 tokens) MKL 510 and oneDNN 558; forward and backward of the standard layer at
# 8,192 tokens, MKL 1.25 s and oneDNN 1.45. oneDNN fuses the activation into its GEMM, which
# pays at small row counts, and its kernels lag MKL's at large ones.
MKL_MIN_ROWS = 256


def _onednn_linear(x: Tensor, w: Tensor, act: str | None = None) -> Tensor:
    attr, algorithm = _ONEDNN_ACT[act]
    return torch.ops.mkldnn._linear_pointwise(x, w, None, attr, [], algorithm)


class _OneDnnLinear(torch.autograd.Function):
    """``x @ w^T`` through oneDNN, forward and backward (the op itself has no autograd)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return _onednn_linear(x, w)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        # oneDNN takes transposed views without a copy: dx = dy @ w, dw = dy^T @ x.
        grad_x = _onednn_linear(grad_y, w.t()) if ctx.needs_input_grad[0] else None
        grad_w = _onednn_linear(grad_y.t(), x.t()) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def cpu_linear(x: Tensor, w: Tensor, act: str | None = None) -> Tensor:
    """``act(x @ w^T)`` by the fastest kernel this build has for the CPU (``F.linear`` else).

    The activation is fused into the GEMM's epilogue when no gradient is needed. Under
    autocast ``x`` may be narrower than ``w``; ``w`` is cast to match, as autocast would.
    """
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if (x.device.type == "cpu" and onednn_available() and x.dtype in onednn_dtypes()
            and x.shape[0] > 0):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if not needs_grad:
            return _onednn_linear(x.contiguous(), w, act)
        return activation_fn(act, _OneDnnLinear.apply(x.contiguous(), w))
    return activation_fn(act, F.linear(x, w))


# oneDNN's own blocked layouts of bf16 expert weights, made once per weight version: a
# product on a packed weight skips the reorder that oneDNN otherwise does on every call.
# A version is the parameter's version counter (bumped by in-place writes: optimizer steps,
# load_state_dict, copy_ under no_grad) and its storage, which the entry keeps alive so that
# new storage cannot reuse its address. Writes through ``.data`` bump no counter: after one,
# `release_packed` (``Experts.train``/``eval`` call it) makes the next forward pack again.
# Measured on an Intel Xeon (AMX, 2 cores), the seed layer's gated bf16 experts at 96 rows
# each (8 x 128 tokens): 40 ms packed against 56 ms plain; at 768 rows no difference; fp32
# (no AMX) ran slower packed (170 against 200 GFLOP/s). Held by the parameter's id with a
# weak reference that drops the packs with it (a tensor cannot be a WeakKeyDictionary key:
# its == is elementwise); kept off the module, so that copying or pickling it never meets
# an opaque oneDNN tensor.
_PACKED: dict[int, tuple[weakref.ref, tuple[int, int], Tensor, tuple[Tensor, ...]]] = {}
PACK_DTYPES = (torch.bfloat16,)


def packable(dtype: torch.dtype) -> bool:
    """Whether weight packing applies to experts of ``dtype`` on this CPU."""
    return (dtype in PACK_DTYPES and dtype in onednn_dtypes() and onednn_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def packed_weights(w_EOI: Tensor) -> tuple[Tensor, ...]:
    """Each expert's ``(O, I)`` weight in oneDNN's layout, remade when the parameter was
    changed in place (its version) or given new storage."""
    key = (w_EOI._version, w_EOI.data_ptr())
    hit = _PACKED.get(id(w_EOI))
    if hit is None or hit[0]() is not w_EOI or hit[1] != key:
        with torch.no_grad():
            packs = tuple(torch.ops.mkldnn._reorder_linear_weight(w_OI, None)
                          for w_OI in w_EOI.detach().unbind(0))
        ident = id(w_EOI)
        ref = weakref.ref(w_EOI, lambda _: _PACKED.pop(ident, None))
        hit = _PACKED[ident] = (ref, key, w_EOI.detach(), packs)
    return hit[3]


def release_packed(weights: Iterable[Tensor]) -> None:
    """Drop the packs of ``weights``: the next bf16 inference forward packs them again."""
    for w in weights:
        _PACKED.pop(id(w), None)


class ExpertSlices:
    """The CPU split path's state for one forward: per-expert weight views, and whether its
    temporaries may be overwritten in place.

    ``weight(w_EOI, e)`` unbinds each stacked weight once per forward and caches the views,
    so backward stacks each weight's gradient once instead of writing a full ``(E, O, I)``
    zero tensor per expert (what indexing ``w[e]`` would cost in backward).

    ``inplace=True`` says that no autograd graph will read the forward's temporaries: the
    activations and products then overwrite their inputs instead of allocating (rows, H)
    tensors. ``packed=True`` (only with it) multiplies by `packed_weights`.
    """

    def __init__(self, inplace: bool = False, packed: bool = False) -> None:
        self._slices: dict[int, tuple[Tensor, ...]] = {}
        self._packs: dict[int, tuple[Tensor, ...]] = {}
        self.inplace = inplace
        self.packed = packed and inplace

    def weight(self, w_EOI: Tensor, expert: int) -> Tensor:
        key = id(w_EOI)
        if key not in self._slices:
            self._slices[key] = w_EOI.unbind(0)
        return self._slices[key][expert]

    def packs(self, w_EOI: Tensor) -> tuple[Tensor, ...]:
        """`packed_weights` of ``w_EOI``, looked up once per forward."""
        key = id(w_EOI)
        if key not in self._packs:
            self._packs[key] = packed_weights(w_EOI)
        return self._packs[key]

    def prefetch(self, weights: Iterable[Tensor], dtype: torch.dtype) -> None:
        """Unbind every stacked weight now, and pack those of the products' ``dtype`` (under
        autocast others are cast per call), before lanes on other threads read them."""
        for w_EOI in weights:
            if w_EOI.dim() == 3:
                self.weight(w_EOI, 0)
                if self.packed and w_EOI.dtype == dtype:
                    self.packs(w_EOI)

    def linear(self, x_nI: Tensor, w_EOI: Tensor, expert: int, act: str | None) -> Tensor:
        """``act(x @ w_EOI[expert]^T)``: ``(n, I) -> (n, O)``, a new tensor."""
        if self.packed and x_nI.dtype == w_EOI.dtype and x_nI.shape[0] > 0:
            return _onednn_linear(x_nI.contiguous(), self.packs(w_EOI)[expert], act)
        w_OI = self.weight(w_EOI, expert)
        if (x_nI.dtype == w_OI.dtype == torch.float32 and x_nI.shape[0] >= MKL_MIN_ROWS
                and mkl_preferred()):
            y_nO = F.linear(x_nI, w_OI)
            return activation_(act, y_nO) if self.inplace else activation_fn(act, y_nO)
        return cpu_linear(x_nI, w_OI, act)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        """``a * b``, written into ``a`` (a temporary of this forward) when in place."""
        return a.mul_(b) if self.inplace else a * b


# Lanes: on the CPU the experts run side by side, one thread each, rather than one after
# another with every thread on each product; the caller is one lane, and every lane takes
# the next expert from one shared queue (largest first) until none is left.
# Why: a product split over two threads ends on a barrier where one waits for the other,
# and a forward holds about a hundred of them (three products, a gather and an add per
# expert). On a quiet machine that costs little; when another process holds a core, each
# barrier waits for a descheduled thread's next time slice. Measured on an Intel Xeon
# (2 cores, fp32, gated seed layer, 1,024 tokens) with other jobs loading both cores:
# two-thread products took 4.7 s a forward, one thread 0.38 s. Lanes on a shared queue
# have no barrier but the last expert: a lane whose core is taken simply takes fewer
# experts, and the caller, which is a lane itself, never waits for a lane to start.
# On a quiet machine bf16 experts gain most (AMX keeps a one-thread product busy: at 768
# rows per expert lanes ran 1.4-1.6x faster than two-thread products, at 96 rows 1.1x).
LANE_DTYPES = (torch.float32, torch.bfloat16)
LANE_MIN_ROWS = 64  # mean rows per busy expert; below it handing work out is not repaid


def lanes_apply(dtype: torch.dtype) -> bool:
    """Whether experts of ``dtype`` may run in lanes on this CPU."""
    return dtype in LANE_DTYPES and dtype in onednn_dtypes()


def cpu_lanes(dtype: torch.dtype, sizes: list[int]) -> int:
    """How many one-thread lanes the CPU split path runs experts on (1: no lanes)."""
    busy = [n for n in sizes if n]
    threads = lane_threads()
    if (not lanes_apply(dtype) or threads < 2
            or len(busy) < 2 or sum(busy) < LANE_MIN_ROWS * len(busy)):
        return 1
    return min(threads, len(busy))


# The rest of a forward (router, top-k, sort, gathers, statistics) is a few dozen small ops,
# each split over every thread and so each ending on a barrier: under a busy neighbour they
# cost as much as the experts. Measured here (gated seed layer, 1,024 tokens, both cores
# loaded by other jobs): lanes with the rest on two threads 2.0-3.3 s a forward, with the
# rest on one thread 0.85 s. On a quiet machine the rest is about 1% of the forward.
_CALLER = threading.local()


def lane_threads() -> int:
    """Threads the lanes may use: the caller's count before `one_thread_caller`, if inside
    one, else its count now."""
    return getattr(_CALLER, "threads", 0) or torch.get_num_threads()


@contextlib.contextmanager
def one_thread_caller() -> Iterator[None]:
    """The calling thread's own ops on one intra-op thread until the block ends, while
    `cpu_lanes` still counts the threads it had; its count is then restored."""
    if getattr(_CALLER, "threads", 0):  # already inside one
        yield
        return
    _CALLER.threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_CALLER.threads)
        _CALLER.threads = 0


def largest_first(sizes: list[int]) -> list[int]:
    """The busy experts, most rows first (ties in expert order): the lanes' queue, so that
    the last expert any lane takes is a small one and the others do not wait long for it."""
    return sorted((e for e, n in enumerate(sizes) if n), key=lambda e: -sizes[e])


_LANE_POOL: ThreadPoolExecutor | None = None
_LANE_LOCK = threading.Lock()


def lane_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of at least ``threads`` threads, each with one intra-op thread.

    ``torch.set_num_threads`` sets the calling thread's OpenMP team size and also the count
    every thread started later begins with; so each lane thread is started and set to one
    here, all at once, and the caller's count is then set again, which leaves the caller and
    later threads as they were. A larger ``threads`` replaces the pool with a larger one.

    Not for forked children: OpenMP cannot run a team again in a child forked after its
    parent ran one (seen here: the child's first multi-threaded product never returns), so
    a prefork worker's parent must not run the model first, lanes or no lanes."""
    global _LANE_POOL
    with _LANE_LOCK:
        if _LANE_POOL is not None and _LANE_POOL._max_workers >= threads:
            return _LANE_POOL
        count = torch.get_num_threads()
        pool = ThreadPoolExecutor(threads, thread_name_prefix="moe-lane")
        started = threading.Barrier(threads)

        def one_thread() -> None:
            torch.set_num_threads(1)
            started.wait()  # every task on its own thread: all lanes start now

        for done in [pool.submit(one_thread) for _ in range(threads)]:
            done.result()
        torch.set_num_threads(count)
        if _LANE_POOL is not None:
            _LANE_POOL.shutdown(wait=False)
        _LANE_POOL = pool
        return pool


class _SharedQueue:
    """Items handed out one at a time to whichever lane asks; results kept by item."""

    def __init__(self, items: list[int], work: Callable[[int], Tensor]) -> None:
        self._items = iter(items)
        self._work = work
        self._left = len(items)
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.results: dict[int, Tensor] = {}
        self.error: BaseException | None = None
        if not items:
            self.done.set()

    def drain(self) -> None:
        """Take and run items until none is left; after a failure, take without running."""
        while True:
            with self._lock:
                item = next(self._items, None)
            if item is None:
                return
            try:
                if self.error is None:
                    self.results[item] = self._work(item)
            except BaseException as exc:  # handed to the caller, which raises it
                self.error = self.error or exc
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self.done.set()


def run_in_lanes(items: list[int], work: Callable[[int], Tensor], lanes: int) -> dict[int, Tensor]:
    """``work(item)`` for every item on ``lanes`` one-thread lanes: ``{item: result}``.

    The caller is one lane (its intra-op thread count is one meanwhile, then restored);
    ``lanes - 1`` pool threads are the others. The caller waits only for items a lane has
    taken: a pool thread that was not scheduled before the queue ran dry finds it empty.
    Grad and inference modes are per thread: the pool's lanes take the caller's.
    """
    queue = _SharedQueue(items, work)
    mode = torch.inference_mode if torch.is_inference_mode_enabled() else torch.no_grad

    def helper() -> None:
        with mode():
            queue.drain()

    pool = lane_pool(lanes - 1)
    for _ in range(lanes - 1):
        pool.submit(helper)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        queue.drain()
    finally:
        torch.set_num_threads(threads)
    queue.done.wait()
    if queue.error is not None:
        raise queue.error
    return queue.results
