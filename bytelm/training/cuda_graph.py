"""A training loss whose forward and backward each replay one CUDA graph.

An eager training step of the 90M byte Mamba at 8K is ~1300 kernels launched from Python, and
the GPU idles between them while the host catches up (benchmarks/NOTES.md). Captured once, the
forward (the model and its loss) and the backward replay in one launch each.

The gradients are added into the parameters' own .grad tensors inside the backward graph. torch's
make_graphed_callables instead hands autograd its static gradient buffers, which AccumulateGrad
may adopt as .grad; with gradient accumulation the next replay then overwrites that .grad before
it is added to, and the step's gradient comes out wrong. Here every .grad is a tensor the graph
owns: a parameter whose .grad was set to None (optimizer.zero_grad) or replaced is bound back to
it before each backward, zeroed or holding the replaced value.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable

import torch

from bytelm.models.cuda_graph import autocast_for_capture, warm_up


class _Replay(torch.autograd.Function):
    """Replays the forward graph; its backward replays the backward graph. `anchor` is one
    parameter, only so that the loss requires grad: gradients reach the parameters through the
    graph, not through autograd."""

    @staticmethod
    def forward(ctx, owner: "GraphedLoss", anchor: torch.Tensor) -> torch.Tensor:
        owner._generation += 1
        ctx.owner, ctx.generation = owner, owner._generation
        owner._fwd.replay()
        return owner._loss.detach().clone()  # the next replay overwrites the static loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        owner = ctx.owner
        if ctx.generation != owner._generation:
            raise RuntimeError("GraphedLoss: a backward through an older call's loss; the graph "
                               "holds one forward's activations, so each call's backward must "
                               "come before the next call")
        bind_grads(owner.params, owner._grads)
        owner._grad_out.copy_(grad)
        owner._bwd.replay()
        return None, None


def bind_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Make grads[i] the .grad of params[i]: a None .grad becomes a zeroed grads[i] (all in one
    foreach launch), any other tensor is copied into it."""
    missing = [g for p, g in zip(params, grads) if p.grad is None]
    if missing:
        torch._foreach_zero_(missing)
    for p, g in zip(params, grads):
        if p.grad is not g:
            if p.grad is not None:
                g.copy_(p.grad)
            p.grad = g


class GraphedLoss:
    """`loss_fn(batch)` -> scalar loss, with its forward and backward replayed from CUDA graphs.

    The graphs are captured on the first call in training (grad enabled), for that batch's
    shape, dtype and device; they hold that step's activations from forward to backward, so
    each call's backward must come before the next call. Calls without grad, or with a batch of
    another shape, run `loss_fn` eagerly (once warned); the next graphed backward adds into
    whatever .grad they leave. A model moved after capture (`.to()`, or Lightning's `.cpu()` at
    the end of a fit) is captured again at the next call. Any randomness in `loss_fn` (dropout)
    is replayed with fresh seeds by torch.

    Unlike eager training: a parameter that gets no gradient gets a zero .grad (AdamW then
    decays it); parameter and gradient hooks do not run, so multi-GPU wrappers (DDP, FSDP),
    which reduce gradients in such hooks, cannot be used; .grad memory is never freed; and the
    graphs' memory (one step's activations) stays reserved between steps, also while
    validation runs.

    params: what the gradients are for (those requiring grad are kept); they must be every
    parameter `loss_fn` differentiates.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 params: Iterable[torch.Tensor], warmup: int = 2):
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GraphedLoss: no parameter requires grad")
        self.warmup = warmup
        self._fwd = None
        self._generation = 0
        self._warned = False

    @property
    def captured(self) -> bool:
        return self._fwd is not None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.loss_fn(batch)
        if self._fwd is not None and self._addresses() != self._captured_at:
            self.release()  # the model moved: the graphs read and write freed memory
        if self._fwd is None:
            self._capture(batch)
        elif (batch.shape, batch.dtype, batch.device) != (self._batch.shape, self._batch.dtype,
                                                          self._batch.device):
            if not self._warned:
                warnings.warn(f"GraphedLoss was captured for a {_describe(self._batch)} batch; "
                              f"a {_describe(batch)} one runs eagerly", stacklevel=2)
                self._warned = True
            return self.loss_fn(batch)
        device = self._batch.device  # a CPU one only in the tests' stand-in graphs
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self._batch.copy_(batch)
            return _Replay.apply(self, self.params[0])

    def release(self) -> None:
        """Drop the graphs and their memory; the next call in training captures again."""
        self._fwd = self._bwd = self._loss = self._grad_out = self._batch = None
        self._generation += 1  # a loss from before cannot run its backward any more

    def _addresses(self) -> list[int]:
        return [t.data_ptr() for t in (*self.params, *self._grads)]

    def _capture(self, batch: torch.Tensor) -> None:
        if batch.device.type != "cuda" or any(p.device.type != "cuda" for p in self.params):
            raise ValueError(f"CUDA-graph training needs the batch and the parameters on a CUDA "
                             f"device; the batch is on {batch.device}")
        with torch.cuda.device(batch.device):
            self._batch = batch.detach().clone()
            # .grad tensors made now, outside any graph's pool, so that the optimizer may keep them
            self._grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                           for p in self.params]
            bind_grads(self.params, self._grads)

            def step():  # torch.autograd.grad leaves .grad alone
                with autocast_for_capture():
                    loss = self.loss_fn(self._batch)
                torch.autograd.grad(loss, self.params, allow_unused=True)

            warm_up(step, self.warmup)
            self._fwd, self._bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            # Capture records kernels without running them: nothing is computed here.
            with torch.cuda.graph(self._fwd), autocast_for_capture():
                self._loss = self.loss_fn(self._batch)
            if self._loss.ndim != 0 or not self._loss.requires_grad:
                raise ValueError("GraphedLoss: loss_fn must return a scalar that requires grad")
            self._grad_out = torch.ones_like(self._loss)
            with torch.cuda.graph(self._bwd, pool=self._fwd.pool()):
                grads = torch.autograd.grad(self._loss, self.params, self._grad_out,
                                            allow_unused=True)
                pairs = [(acc, g) for acc, g in zip(self._grads, grads) if g is not None]
                torch._foreach_add_([acc for acc, _ in pairs], [g for _, g in pairs])
            self._captured_at = self._addresses()


def _describe(batch: torch.Tensor) -> str:
    return f"{tuple(batch.shape)} {batch.dtype} {batch.device}"
