"""Training steps replayed as CUDA graphs: the same kernels, launched as one graph per step.

A step of steps 1-3 launches hundreds to thousands of small kernels; on a GPU the host's launch
overhead, not the arithmetic, sets the pace. :class:`GraphedStep` captures a step function -- a
forward pass, the losses and ``backward()``, writing each parameter's ``.grad`` -- once, and
replays it at every later call; the optimizer step stays eager (Python-float learning rates, so
schedulers work unchanged). The maths is that of the eager step: the step function must only be
free of host syncs and data-dependent shapes (texq's steps are: tests run them on the ``meta``
device, where either would fail).

Capture follows PyTorch's recipe: a few eager warm-up calls on a side stream (lazy
initialisation, cuDNN/cuBLAS handles), then capture. Warm-up calls run real computations, so every
tensor ``state()`` names (buffers a forward pass updates, such as BatchNorm running statistics)
and the device's RNG state are restored afterwards: the first replay starts from the state the
eager step would have seen. Without CUDA (or with ``enabled=False``) the step runs eagerly; with
``rehearse=True`` it runs the warm-up and restore without capturing, which is how the CPU tests
check that warm-up leaves no trace.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor


def rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class GraphedStep:
    """``step(*args)`` -> the tensors ``fn(*args)`` returns; replayed as a CUDA graph when enabled.

    ``params``: the tensors whose ``.grad`` ``fn`` writes (their gradients are reset before each
    eager call and live in the graph's memory once captured: never set them to None afterwards).
    ``state``: a callable listing the tensors to restore after the warm-up calls.
    ``key``: a callable returning the Python-side values a capture bakes in (modes, frozen
    constants); when they change, the step is captured again. ``reset()`` forces that.
    On replay, tensor arguments are copied into the captured ones unless they are the same tensor
    (pass a previous graph's outputs to chain graphs without a copy). Outputs are overwritten by
    the next replay: consume them (or clone) before calling again.
    """

    def __init__(self, fn: Callable[..., object], device: torch.device, params: Sequence[Tensor],
                 state: Callable[[], list[Tensor]] = list, enabled: bool = True,
                 warmup: int = 3, rehearse: bool = False, key: Callable[[], object] = lambda: None):
        self.fn, self.device, self.params, self.state = fn, torch.device(device), list(params), state
        self.key, self._key = key, None
        self.capture = enabled and self.device.type == "cuda"
        self.rehearse = rehearse and not self.capture
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_args: tuple = ()
        self.out: object = None
        self._rehearsed = False

    def _zero_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def reset(self) -> None:
        """Drop the capture (and the rehearsal): the next call captures afresh."""
        self.graph, self.out, self.static_args, self._rehearsed = None, None, (), False

    def __call__(self, *args):
        if (self.graph is not None or self._rehearsed) and self.key() != self._key:
            self.reset()
        if self.capture:
            if self.graph is None:
                self._capture(args)
            else:
                for s, a in zip(self.static_args, args):
                    if isinstance(a, Tensor) and a is not s:
                        s.copy_(a)
            self.graph.replay()
            return self.out
        if self.rehearse and not self._rehearsed:
            self._warm(args)
            self._rehearsed, self._key = True, self.key()
        self._zero_grads()
        return self.fn(*args)

    def _warm(self, args: tuple) -> None:
        """Run ``fn`` ``warmup`` times, then restore ``state()`` and the RNG."""
        saved = [t.detach().clone() for t in self.state()]
        rng = rng_state(self.device)
        side = torch.cuda.Stream(self.device) if self.capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(self.warmup):
                self._zero_grads()
                self.fn(*args)
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():
            for t, s in zip(self.state(), saved):
                t.copy_(s)
        set_rng_state(rng, self.device)

    def _capture(self, args: tuple) -> None:
        self.static_args = args
        self._warm(args)
        rng = rng_state(self.device)
        self._zero_grads()  # gradients are allocated inside the graph's memory pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = self.fn(*args)
        set_rng_state(rng, self.device)
        self._key = self.key()


def module_state(*modules: torch.nn.Module) -> Callable[[], list[Tensor]]:
    """``state`` for :class:`GraphedStep`: every buffer of ``modules`` (BatchNorm statistics,
    activation ranges)."""
    return lambda: [b for m in modules if m is not None for b in m.buffers()]
