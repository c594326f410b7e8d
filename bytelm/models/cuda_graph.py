"""One generation step of an LM, captured once in a CUDA graph and then replayed.

At batch 1 a step of a byte Mamba is hundreds of small kernels, and launching them from Python
costs more than running them. A graph replays the whole step in one launch. This needs states of
a fixed size, updated in place: Mamba's conv and SSM states are; attention's KV cache grows every
step, so models with attention decode eagerly.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from bytelm.models.lm import LM, BlockState


def graphable(model: LM) -> bool:
    """True when every block's decoding state has a fixed size: no attention (a KV cache)."""
    return "A" not in model.cfg.blocks


def _state_tensors(states: list[BlockState]) -> list[torch.Tensor]:
    return [getattr(s, f.name) for s in states if s is not None for f in dataclasses.fields(s)
            if isinstance(getattr(s, f.name), torch.Tensor)]


def autocast_for_capture():
    """The caller's CUDA autocast, with its weight-cast cache off: a cast cached during capture
    would be a tensor the graph reads but nobody refreshes (torch's CUDA-graph notes)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def warm_up(fn, times: int) -> None:
    """Run fn `times` times on a side stream, as torch asks before a capture: Triton compiles
    and cuBLAS picks its kernels off the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


class GraphedStep:
    """`model.step(ids, states)` as a CUDA graph. Call it with (batch,) ids of the example's
    shape; it updates `states` in place and returns the logits in a buffer that the next call
    overwrites (read or copy them before calling again)."""

    def __init__(self, model: LM, states: list[BlockState], example_ids: torch.Tensor,
                 warmup: int = 2):
        if not graphable(model):
            raise ValueError("CUDA-graph decoding needs fixed-size states; attention's KV cache "
                             "grows every step (decode such models eagerly)")
        if example_ids.device.type != "cuda":
            raise ValueError(f"CUDA-graph decoding needs a CUDA device, got {example_ids.device}")
        self.ids = example_ids.detach().clone()
        # Streams, capture and replay belong to the current CUDA device: make it the ids' one
        # (a model on cuda:1 must not be captured on cuda:0).
        with torch.cuda.device(self.ids.device):
            self._capture(model, states, warmup)

    def _capture(self, model: LM, states: list[BlockState], warmup: int):
        tensors = _state_tensors(states)
        saved = [t.clone() for t in tensors]
        def step():
            with autocast_for_capture(), torch.no_grad():
                model.step(self.ids, states)

        warm_up(step, warmup)  # it advances the states, which are then put back
        for t, s in zip(tensors, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        # Capture records kernels without running them: the states are untouched here.
        with torch.cuda.graph(self.graph), autocast_for_capture(), torch.no_grad():
            self.logits = model.step(self.ids, states)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape != self.ids.shape or ids.device != self.ids.device:
            # copy_ would broadcast a (1,) tensor into the batch or move it between devices
            raise ValueError(f"GraphedStep was captured for ids of shape {tuple(self.ids.shape)} "
                             f"on {self.ids.device}, got {tuple(ids.shape)} on {ids.device}")
        self.ids.copy_(ids)
        with torch.cuda.device(self.ids.device):
            self.graph.replay()
        return self.logits


GRAPH_MIN_STEPS = 32  # fewer steps than this do not repay the warm-up and capture


def use_graph(cuda_graph: bool | None, model: LM, device: torch.device, n_steps: int) -> bool:
    """Whether to decode from a CUDA graph: cuda_graph if given (True on a model or device that
    cannot be graphed is a ValueError, raised before any work), else on CUDA for models without
    attention that will take at least GRAPH_MIN_STEPS steps."""
    possible = torch.device(device).type == "cuda" and graphable(model)
    if cuda_graph and not possible:
        raise ValueError(f"CUDA-graph decoding needs a CUDA device and a model without attention "
                         f"(its KV cache grows); got {device} and layers {model.cfg.blocks!r}")
    return possible and n_steps >= GRAPH_MIN_STEPS if cuda_graph is None else bool(cuda_graph)


def decode_step(model: LM, states: list[BlockState], example_ids: torch.Tensor, graph: bool):
    """A callable ids -> logits that advances `states` by one id per sequence: a GraphedStep
    when graph is True (see use_graph), else model.step."""
    if graph:
        return GraphedStep(model, states, example_ids)
    return lambda ids: model.step(ids, states)
