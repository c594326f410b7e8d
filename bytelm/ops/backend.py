"""Which implementation an op runs: its plain-PyTorch reference or its Triton kernels."""

from __future__ import annotations

import torch


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Will autograd run a backward through an op on these inputs? Decided by the caller, before
    autograd.Function.apply: inside forward() grad mode is always off, and ctx.needs_input_grad
    ignores no_grad / inference_mode, so an op deciding there would save (or store) what no
    backward reads."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(op: str, backend: str, device: torch.device, choices: tuple[str, ...]) -> str:
    """"auto" is "triton" on CUDA tensors and "ref" elsewhere; anything not in `choices` is a
    one-line ValueError naming the op."""
    if backend not in choices:
        raise ValueError(f"unknown {op} backend {backend!r}; choose one of {', '.join(choices)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "ref"
    return backend
