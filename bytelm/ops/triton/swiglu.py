"""Fused SwiGLU gate: forward and backward kernels and the autograd op.

Maths and shapes as `bytelm.ops.swiglu.swiglu_ref` (the reference beside it):
    x   : (..., 2 * hidden) viewed as (rows, 2 * hidden), unit last stride   [gate | up]
    out : (rows, hidden) contiguous, x.dtype

    forward : out = g s u,                              s = sigmoid(g)
    backward: dg = dout u s (1 + g (1 - s)),  du = dout g s   -> d(x) (rows, 2 * hidden)

All in fp32 (fp64 inputs take the reference), one rounding to x.dtype a result (the reference
rounds silu(g) and then the product). A program takes a (BLOCK_R, BLOCK_C) tile of rows x hidden columns; the backward
saves only x (the reference also keeps silu(g), another (rows, hidden) tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bytelm.ops.backend import needs_autograd
from bytelm.ops.triton.layout import (as_rows, cdiv, empty_output as _empty, next_pow2,
                                      unit_last_stride)

BLOCK_ELEMS = 4096  # elements of out a program


@triton.jit
def _swiglu_fwd_kernel(X, OUT, n_rows, hidden, stride_x, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < hidden)[None, :]
    px = X + (rows.to(tl.int64) * stride_x)[:, None] + cols[None, :]
    g = tl.load(px, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(px + hidden, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    po = OUT + (rows.to(tl.int64) * hidden)[:, None] + cols[None, :]
    tl.store(po, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(X, DOUT, DX, n_rows, hidden, stride_x, stride_dout, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < hidden)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    px = X + r64 * stride_x + cols[None, :]
    g = tl.load(px, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(px + hidden, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + r64 * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dout * u * s * (1.0 + g * (1.0 - s))
    du = dout * g * s
    pd = DX + r64 * (2 * hidden) + cols[None, :]
    tl.store(pd, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(pd + hidden, du.to(DX.dtype.element_ty), mask=mask)


def _tiles(n_rows, hidden):
    block_c = min(next_pow2(hidden), 1024)
    block_r = max(1, BLOCK_ELEMS // block_c)
    return block_r, block_c, (cdiv(n_rows, block_r), cdiv(hidden, block_c))


def swiglu_fwd(x2):
    """x2 (rows, 2 * hidden), unit last stride -> out (rows, hidden) contiguous, x2's dtype."""
    n_rows, hidden = x2.shape[0], x2.shape[1] // 2
    out = _empty(n_rows, hidden, device=x2.device, dtype=x2.dtype)
    block_r, block_c, grid = _tiles(n_rows, hidden)
    _swiglu_fwd_kernel[grid](x2, out, n_rows, hidden, x2.stride(0), BLOCK_R=block_r,
                             BLOCK_C=block_c, num_warps=8)
    return out


def swiglu_bwd(x2, dout2):
    """x2 (rows, 2 * hidden), dout2 (rows, hidden), unit last strides -> d(x2) (rows,
    2 * hidden) contiguous in x2's dtype."""
    n_rows, hidden = dout2.shape
    dx = _empty(n_rows, 2 * hidden, device=x2.device, dtype=x2.dtype)
    block_r, block_c, grid = _tiles(n_rows, hidden)
    _swiglu_bwd_kernel[grid](x2, dout2, dx, n_rows, hidden, x2.stride(0), dout2.stride(0),
                             BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    return dx


class SwiGLUFn(torch.autograd.Function):
    """x2 (rows, 2 * hidden) -> (rows, hidden); callers reshape outside, so that the output is
    not a view made inside the Function (autograd would refuse in-place ops on it)."""

    @staticmethod
    def forward(ctx, x2):
        ctx.save_for_backward(x2)
        return swiglu_fwd(x2)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: say so, not zeros
    def backward(ctx, dout):
        (x2,) = ctx.saved_tensors
        return swiglu_bwd(x2, unit_last_stride(dout))


def swiglu_triton(x: torch.Tensor) -> torch.Tensor:
    """Fused silu(gate) * up; argument and result as `bytelm.ops.swiglu.swiglu_ref`."""
    from bytelm.ops.swiglu import check_swiglu, swiglu_ref

    hidden = check_swiglu(x)
    if x.numel() == 0 or x.dtype == torch.float64:  # the kernels compute in fp32
        return swiglu_ref(x)
    fwd = SwiGLUFn.apply if needs_autograd(x) else swiglu_fwd
    return fwd(as_rows(x)).view(*x.shape[:-1], hidden)
