"""The optimised system: the same modules as `MixtureOfExpertsSystem` under torch.compile,
mixed precision and gradient checkpointing, and on CUDA inference replayed from CUDA graphs.

Kept apart from `system.py` so that the plain model reads top to bottom without the
machinery that only makes it faster; nothing here changes what the model computes.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

from pipeline.errors import InputShapeError
from pipeline.moe.config import MoEConfig
from pipeline.moe.layer import MoEAux, RoutingConstraint
from pipeline.moe.system import MixtureOfExpertsSystem, SystemOutput

# Compile modes whose inductor output already replays as CUDA graphs (cudagraph trees).
_INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def graph_tokens(x: Tensor, max_tokens: int) -> int:
    """Tokens of an inference batch ``(B, N, D)`` or ``(B, D)``, refused past ``max_tokens``
    (`OptimizationConfig.cuda_graph_max_tokens`, the static buffer's size)."""
    tokens = x.numel() // max(1, x.shape[-1])
    if tokens > max_tokens:
        raise InputShapeError("x", tuple(x.shape), f"at most cuda_graph_max_tokens={max_tokens} "
                              f"tokens (batch x sequence, here {tokens}) for CUDA-graph "
                              "inference: raise MoEConfig.cuda_graph_max_tokens, split the "
                              "batch, or set use_cuda_graphs=False")
    return tokens


class GraphedInference:
    """The inference forward as CUDA graphs over one static input buffer.

    The buffer holds ``max_tokens`` tokens, allocated once (per dtype and width); a batch of shape
    ``(B, N, D)`` is copied into its first ``B*N`` rows and replays the graph captured for that
    shape (captured on first sight, after two warm-up calls on a side stream that compile,
    autotune and fill the allocator). Graphs share one memory pool: each replay's outputs are
    cloned before the next replay may reuse their memory, and replays run on one stream, so
    sharing is safe (the pattern of torch.cuda.graph's docs, "sharing memory across captures").
    A lock keeps two threads from interleaving copy, replay and clone.

    At most ``max_graphs`` shapes keep their graph; past that the least recently replayed
    one goes (a server seeing many sequence lengths would otherwise hold a graph and its
    memory for each of them).
    """

    def __init__(self, max_tokens: int, max_graphs: int = 16) -> None:
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self._buffers: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Any]] = (
            OrderedDict())
        self._pool: Any = None
        self._lock = threading.Lock()

    def __call__(self, fn: Callable[[Tensor, bool], SystemOutput], x: Tensor, device: torch.device,
                 reports: bool) -> SystemOutput:
        with self._lock:
            return self._replay(fn, x, device, reports)

    def _replay(self, fn: Callable[[Tensor, bool], SystemOutput], x: Tensor,
                device: torch.device, reports: bool) -> SystemOutput:
        tokens = graph_tokens(x, self.max_tokens)
        key = (tuple(x.shape), x.dtype, device, reports)
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            slot = (device, x.dtype, x.shape[-1])
            buf = self._buffers.get(slot)
            if buf is None:
                buf = torch.empty(self.max_tokens * x.shape[-1], dtype=x.dtype, device=device)
                self._buffers[slot] = buf
            static_x = buf[: tokens * x.shape[-1]].view(x.shape)
            static_x.copy_(x)
            self._graphs[key] = self._capture(fn, static_x, device, reports)
        graph, static_x, out = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)

    def _capture(self, fn: Callable[[Tensor, bool], SystemOutput], static_x: Tensor,
                 device: torch.device, reports: bool) -> tuple:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(static_x, reports)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn(static_x, reports)
        return graph, static_x, out


class FullyOptimizedMoESystem(MixtureOfExpertsSystem):
    """The same model under torch.compile, autocast and gradient checkpointing.

    Each switch comes from the config: ``use_compile`` (with ``compile_mode``), ``use_amp``
    (``amp_dtype``; float16 trains with a gradient scaler), ``use_gradient_checkpointing``
    (blocks recompute their activations in backward). On CUDA, ``infer`` replays CUDA graphs
    (`GraphedInference`, ``use_cuda_graphs`` with ``cuda_graph_max_tokens``), unless the
    compile mode already does (``reduce-overhead``, ``max-autotune``).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.optimization = config.optimization  # its part; the modules read layer and system
        self._compiled: Callable[..., SystemOutput] | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._graphs: GraphedInference | None = None

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> FullyOptimizedMoESystem:
        # .to()/.cuda()/.half() may replace the parameters a captured graph reads.
        self._graphs = None
        return super()._apply(fn, *args, **kwargs)

    def _runner(self) -> Callable[..., SystemOutput]:
        if not self.optimization.use_compile:
            return self.run
        if self._compiled is None:
            self._compiled = torch.compile(self.run, mode=self.optimization.compile_mode)
        return self._compiled

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.optimization.use_amp:
            return contextlib.nullcontext()
        device = next(self.parameters()).device.type
        return torch.autocast(device, dtype=getattr(torch, self.optimization.amp_dtype))

    def _call_block(self, block: nn.Module, h: Tensor, constraint: RoutingConstraint | None,
                    pool: bool) -> tuple[Tensor, MoEAux]:
        if (self.optimization.use_gradient_checkpointing and self.training
                and torch.is_grad_enabled()):
            return checkpoint(block, h, constraint, pool, use_reentrant=False)
        return block(h, constraint, pool)

    def _step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        if not (self.optimization.use_amp and self.optimization.amp_dtype == "float16"):
            super()._step(loss, optimizer)
            return
        if self._scaler is None:  # fp16 gradients underflow without loss scaling
            device = next(self.parameters()).device.type
            self._scaler = torch.amp.GradScaler(device)
        self._scaler.scale(loss).backward()
        self._scaler.step(optimizer)
        self._scaler.update()

    @torch.inference_mode()
    def infer(self, x: Tensor, reports: bool = False) -> SystemOutput:
        """Inference: eval mode, no autograd, the compiled and autocast forward; on CUDA
        replayed from a CUDA graph (a batch past ``cuda_graph_max_tokens`` tokens is refused
        with `InputShapeError` naming the setting)."""
        self.eval()
        device = next(self.parameters()).device
        opt = self.optimization
        if (device.type == "cuda" and opt.use_cuda_graphs
                and not (opt.use_compile and opt.compile_mode in _INDUCTOR_GRAPH_MODES)):
            if self._graphs is None:
                self._graphs = GraphedInference(opt.cuda_graph_max_tokens)
            return self._graphs(self._graph_forward, x, device, reports)
        with self._autocast():
            return self._runner()(x, reports=reports)

    def _graph_forward(self, x: Tensor, reports: bool) -> SystemOutput:
        # Autocast's cast cache must be off under capture: cached casts would outlive it.
        opt = self.optimization
        amp = contextlib.nullcontext() if not opt.use_amp else torch.autocast(
            "cuda", dtype=getattr(torch, opt.amp_dtype), cache_enabled=False)
        with amp:
            return self._runner()(x, reports=reports)
