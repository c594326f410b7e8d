"""Which implementation an op runs: its plain-PyTorch reference or its Triton kernels."""

from __future__ import annotations

import torch


def resolve_backend(op: str, backend: str, device: torch.device, choices: tuple[str, ...]) -> str:
    """"auto" is "triton" on CUDA tensors and "ref" elsewhere; anything not in `choices` is a
    one-line ValueError naming the op."""
    if backend not in choices:
        raise ValueError(f"unknown {op} backend {backend!r}; choose one of {', '.join(choices)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "ref"
    return backend
