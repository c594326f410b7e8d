"""RMSNorm: the plain-PyTorch reference and the backend switch.

    x      : (..., dim)   fp32 / bf16 / fp16, any number of leading dims (rows)
    weight : (dim,)       fp32 (any float dtype; used as fp32)
    out    : (..., dim)   x.dtype

    y = x32 * rsqrt(mean(x32 ** 2, -1) + eps) * weight32, cast back to x.dtype,

all in fp32 whatever the input dtype (x32 = x.float()), so under autocast an fp32 residual
stream stays fp32. `rms_norm_fn` picks a backend: "ref" (this file, autograd gives the
gradients) or "triton" (fused forward and backward kernels, bytelm/ops/triton/rms_norm.py;
CUDA or the Triton interpreter); "auto" means triton on CUDA tensors and ref elsewhere.
"""

from __future__ import annotations

import torch

from bytelm.ops.backend import resolve_backend as _resolve

BACKENDS = ("auto", "ref", "triton")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x: (..., dim); weight: (dim,). Returns (..., dim) in x.dtype, computed in fp32.

    Exactly the operations bytelm's RMSNorm module has always run (checkpoints and CPU runs
    reproduce bit for bit)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm_fn(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                backend: str = "auto") -> torch.Tensor:
    """RMSNorm through the chosen backend; arguments and shapes as `rms_norm_ref`."""
    if _resolve("rms_norm", backend, x.device, BACKENDS) == "triton":
        from bytelm.ops.triton.rms_norm import rms_norm_triton
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
