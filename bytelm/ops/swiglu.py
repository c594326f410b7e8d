"""SwiGLU's gate: silu(gate) * up from one projection's output: the plain-PyTorch reference and
the backend switch.

    x   : (..., 2 * hidden)   [gate | up], any float dtype (the MLP's in_proj output)
    out : (..., hidden)       x.dtype

    out = silu(gate) * up,  silu(g) = g * sigmoid(g)

`swiglu_fn` picks a backend: "ref" (this file: PyTorch's silu and product, each rounded to
x.dtype; autograd gives the gradient) or "triton" (bytelm/ops/triton/swiglu.py: one kernel a
direction, fp32 inside (fp64 inputs take the reference), one rounding; the backward writes
d(gate | up) in one buffer and saves only x); "auto" means triton on CUDA tensors and ref
elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bytelm.ops.backend import resolve_backend as _resolve

BACKENDS = ("auto", "ref", "triton")


def check_swiglu(x: torch.Tensor) -> int:
    """One-line ValueError for an x that does not split into gate and up; returns hidden."""
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim must hold gate and up (even), got shape "
                         f"{tuple(x.shape)}")
    return x.shape[-1] // 2


def swiglu_ref(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2 * hidden) -> silu(x[..., :hidden]) * x[..., hidden:], (..., hidden) in x.dtype.
    The operations the MLP module has always run."""
    check_swiglu(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_fn(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`swiglu_ref` through the chosen backend; same arguments and result."""
    if _resolve("swiglu", backend, x.device, BACKENDS) == "triton":
        from bytelm.ops.triton.swiglu import swiglu_triton
        return swiglu_triton(x)
    return swiglu_ref(x)
