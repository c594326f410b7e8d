"""RMSNorm: the plain-PyTorch reference and the backend switch.

    x      : (..., dim)   fp32 / bf16 / fp16, any number of leading dims (rows)
    weight : (dim,)       fp32 (any float dtype; used as fp32)
    out    : (..., dim)   x.dtype

    y = x32 * rsqrt(mean(x32 ** 2, -1) + eps) * weight32, cast back to x.dtype,

all in fp32 whatever the input dtype (x32 = x.float()), so under autocast an fp32 residual
stream stays fp32. `rms_norm_fn` picks a backend: "ref" (this file, autograd gives the
gradients) or "triton" (fused forward and backward kernels, bytelm/ops/triton/rms_norm.py;
CUDA or the Triton interpreter); "auto" means triton on CUDA tensors and ref elsewhere.

Residual add + RMSNorm in one pass (a pre-norm block's `residual + x`, then the next norm):

    x            : (..., dim)   any float dtype (a block's output)
    residual     : (..., dim)   any float dtype, normally fp32 (the residual stream); None for the
                                first block (nothing to add yet)
    weight       : (dim,)
    y            : (..., dim)   out_dtype (None: x.dtype)
    residual_out : (..., dim)   fp32 (fp64 if an input is fp64): residual + x computed in that
                                dtype (x alone when residual is None). The stream stays fp32 also
                                when the model's weights are bf16 (bf16-true), as with mamba_ssm's
                                residual_in_fp32: a bf16 sum would lose the small updates of
                                deep stacks.

    y = rms_norm(residual_out) * weight, cast to out_dtype

Gated RMSNorm (the Mamba-2 mixer's, mamba_ssm's RMSNormGated with the gate before the norm):
`gated_rms_norm_ref(y, z, weight, eps, groups)` normalises g = y32 * silu(z32) over each of
`groups` equal slices of a row; `gated_rms_norm_fn` picks the reference or the fused Triton
kernels (bytelm/ops/triton/gated_norm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _check_add_norm(x, residual, weight):
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"add_rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual of shape {tuple(residual.shape)} for x of "
                         f"shape {tuple(x.shape)}")


def stream_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """The residual stream's dtype: fp32, or fp64 when x or residual is fp64."""
    wide = torch.float64 in (x.dtype, residual.dtype if residual is not None else None)
    return torch.float64 if wide else torch.float32


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float = 1e-5, out_dtype: torch.dtype | None = None):
    """x, residual (or None): (..., dim); weight: (dim,). Returns (y in out_dtype (None:
    x.dtype), residual_out in `stream_dtype`), both (..., dim); shapes and maths in the module
    docstring.

    For an fp32 stream, the same operations as the unfused `residual + x` then `rms_norm_ref`
    (fp32 + bf16 adds in fp32 in PyTorch too): a model built on it reproduces the unfused one
    bit for bit."""
    _check_add_norm(x, residual, weight)
    acc = stream_dtype(x, residual)
    residual_out = x.to(acc) if residual is None else residual.to(acc) + x.to(acc)
    return rms_norm_ref(residual_out, weight, eps).to(out_dtype or x.dtype), residual_out


def add_rms_norm_fn(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float = 1e-5, out_dtype: torch.dtype | None = None,
                    backend: str = "auto"):
    """Residual add + RMSNorm through the chosen backend; arguments, shapes and results as
    `add_rms_norm_ref`."""
    if _resolve("rms_norm", backend, x.device, BACKENDS) == "triton":
        from bytelm.ops.triton.rms_norm import add_rms_norm_triton
        return add_rms_norm_triton(x, residual, weight, eps, out_dtype)
    return add_rms_norm_ref(x, residual, weight, eps, out_dtype)


MAX_GATED_DIM = 8192  # widest row the Triton gated norm holds in registers; wider take the ref


def check_gated_args(z, weight, groups, y=None):
    """One-line errors for the gated norm's inputs: z (..., dim) and y of z's shape (None: not
    made yet, as in the Mamba-2 node's entry checks), weight (dim,), groups dividing dim."""
    if z.dim() < 1:
        raise ValueError("gated_rms_norm: z must have a channel dim, got a 0-d tensor")
    if y is not None and z.shape != y.shape:
        raise ValueError(f"gated_rms_norm: z of shape {tuple(z.shape)} for y of shape {tuple(y.shape)}")
    if weight.shape != z.shape[-1:]:
        raise ValueError(f"gated_rms_norm: weight of shape {tuple(weight.shape)} for rows of {z.shape[-1]}")
    if groups < 1 or z.shape[-1] % groups:
        raise ValueError(f"gated_rms_norm: {groups} groups do not divide rows of {z.shape[-1]}")


def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                       groups: int = 1) -> torch.Tensor:
    """The Mamba-2 mixer's norm (mamba_ssm's RMSNormGated, gate before the norm), all in fp32:

        y, z   : (..., dim)   the scan's output and the gate (any strides)
        weight : (dim,)
        out    : (..., dim)   y.dtype

        g = y32 * silu(z32), viewed as (..., groups, dim / groups);
        out = g * rsqrt(mean(g ** 2 over each group) + eps) * weight32
    """
    check_gated_args(z, weight, groups, y)
    g = (y.float() * F.silu(z.float())).unflatten(-1, (groups, -1))
    g = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(-2)
    return (g * weight.float()).to(y.dtype)


def gated_rms_norm_fn(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                      groups: int = 1, backend: str = "auto") -> torch.Tensor:
    """The gated RMSNorm through the chosen backend; arguments and shapes as `gated_rms_norm_ref`."""
    if _resolve("rms_norm", backend, y.device, BACKENDS) == "triton":
        from bytelm.ops.triton.gated_norm import gated_rms_norm_triton
        return gated_rms_norm_triton(y, z, weight, eps, groups)
    return gated_rms_norm_ref(y, z, weight, eps, groups)
