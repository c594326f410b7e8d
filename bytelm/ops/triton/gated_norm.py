"""Fused Triton gated RMSNorm, the Mamba-2 mixer's norm: forward and backward kernels and the
autograd op. Maths and shapes as `bytelm.ops.rms_norm.gated_rms_norm_ref` (the reference):

    y, z   : (rows, dim)        any strides (fast for rows with adjacent columns: the mixer's)
    weight : (dim,)
    out    : (rows, dim)        y.dtype, contiguous
    rstd   : (rows, groups)     fp32: all the forward saves beside y and z

    forward : g = y * silu(z);  ghat = g * rstd (rstd of each group);  out = ghat * w
    backward: dg = rstd * (dout*w - ghat * mean_group(dout*w * ghat))
              dy = dg * silu(z);  dz = dg * y * sig(z) * (1 + z * (1 - sig(z)))
              dw = sum over rows of dout * ghat

Why the gate is here and not in the scan: gating inside the SSD kernels made their backward
recompute the scan's output (a dot, a tile and the sigmoid) for dz in a kernel that is short of
registers; ungated, the SSD's fwd + bwd takes 2.47 ms where it took 3.73 at 8 x 8192 x 24 heads
on the H200 (benchmarks/NOTES.md, twenty-second session). Here the gate costs an extra read of
z in each pass and the write of dz, at bandwidth. mamba_ssm's Mamba2 gates in its norm too.

A program takes BLOCK_M whole rows (BLOCK_N = next power of two >= dim columns, masked) into
registers. Every tensor is addressed through its own strides, so any layout is correct, but
the kernels are fast for rows with adjacent columns (the mixer's z is such rows): a
channel-major z (rows adjacent) made Triton move each tile between layouts, and the backward
took 0.64 ms at best for 65536 x 1536 in bf16, against 0.39 for rows (benchmarks/NOTES.md,
twenty-second session). The backward is persistent (a fixed number of programs
walk the row tiles) and keeps its share of dw as a (BLOCK_N,) fp32 vector; each program writes
one row of a (programs, dim) buffer that torch sums, so dw is deterministic.

groups > 1 (the mixer's n_groups): each group of dim / groups columns has its own rstd; the
kernels loop over the GROUPS (a constexpr) with masked sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bytelm.ops.backend import needs_autograd
from bytelm.ops.rms_norm import MAX_GATED_DIM, check_gated_args, gated_rms_norm_ref
from bytelm.ops.triton.layout import cdiv, empty_output as _empty, unit_last_stride
from bytelm.ops.triton.rms_norm import _n_programs, rms_norm_config


@triton.jit
def _gated_norm_fwd_kernel(Y, Z, W, OUT, RSTD, n_rows, dim, group_size, s_yr, s_yc, s_zr, s_zc,
                           s_or, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           GROUPS: tl.constexpr, STORE_RSTD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]  # a channel-major z's column stride is the row count
    y = tl.load(Y + r64 * s_yr + c64 * s_yc, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + r64 * s_zr + c64 * s_zc, mask=mask, other=0.0).to(tl.float32)
    g = y * z * tl.sigmoid(z)
    if GROUPS == 1:
        rstd = tl.math.rsqrt(tl.sum(g * g, axis=1) / dim + eps)
        if STORE_RSTD:
            tl.store(RSTD + rows, rstd, mask=row_ok)
        scale = rstd[:, None]
    else:
        group = cols // group_size
        scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(GROUPS):
            sel = (group == k)[None, :]
            rstd = tl.math.rsqrt(tl.sum(tl.where(sel, g * g, 0.0), axis=1) / group_size + eps)
            if STORE_RSTD:
                tl.store(RSTD + rows * GROUPS + k, rstd, mask=row_ok)
            scale = tl.where(sel, rstd[:, None], scale)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(OUT + r64 * s_or + c64, (g * scale * w[None, :]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_norm_bwd_kernel(Y, Z, W, DOUT, RSTD, DY, DZ, DW, n_rows, dim, group_size, n_tiles,
                           s_yr, s_yc, s_zr, s_zc, s_dor, s_dyr, s_dyc, s_dzr, s_dzc,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                           HAS_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    c64 = cols.to(tl.int64)[None, :]
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # this program's share of dw
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        y = tl.load(Y + r64 * s_yr + c64 * s_yc, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + r64 * s_zr + c64 * s_zc, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + r64 * s_dor + c64, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        silu = z * sig
        wdo = dout * w[None, :]
        if GROUPS == 1:
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # masked rows: ghat = 0
            ghat = y * silu * rstd[:, None]
            c = tl.sum(ghat * wdo, axis=1) / dim
            dg = (wdo - ghat * c[:, None]) * rstd[:, None]
        else:
            group = cols // group_size
            scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in tl.static_range(GROUPS):
                rstd = tl.load(RSTD + rows * GROUPS + k, mask=row_ok, other=0.0)
                scale = tl.where((group == k)[None, :], rstd[:, None], scale)
            ghat = y * silu * scale
            prod = ghat * wdo
            cs = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in tl.static_range(GROUPS):
                sel = (group == k)[None, :]
                c = tl.sum(tl.where(sel, prod, 0.0), axis=1) / group_size
                cs = tl.where(sel, c[:, None], cs)
            dg = (wdo - ghat * cs) * scale
        tl.store(DY + r64 * s_dyr + c64 * s_dyc, (dg * silu).to(DY.dtype.element_ty), mask=mask)
        tl.store(DZ + r64 * s_dzr + c64 * s_dzc,
                 (dg * y * sig * (1.0 + z * (1.0 - sig))).to(DZ.dtype.element_ty), mask=mask)
        if HAS_DW:
            acc += tl.sum(dout * ghat, axis=0)
    if HAS_DW:
        tl.store(DW + pid * dim + cols, acc, mask=col_ok)


def gated_norm_config(dim: int, device: torch.device, backward: bool = False,
                      element_size: int = 2) -> dict:
    """The plain norm's tiles (`rms_norm_config`), with twice its warps in the backward (it
    reads three inputs and writes two outputs where the plain one reads two and writes one).
    Measured on the H200 at 65536 x 1536 bf16 (`benchmarks/rms_norm.py --op gated --tune`):
    forward 2 rows a tile, 8 warps, 0.151 ms (the plain norm's rule); backward one row a tile,
    8 warps, 8 programs an SM 0.390 ms, against 0.450 with the plain norm's 4 warps."""
    cfg = rms_norm_config(dim, device, backward, element_size)
    if backward and device.type == "cuda":
        cfg["num_warps"] = min(16, 2 * cfg["num_warps"])
        cfg["PROGRAMS_PER_SM"] = max(1, min(8, 64 // cfg["num_warps"]))
    return cfg


def _check_rows(name, t):
    if t.dim() != 2:
        raise ValueError(f"gated_norm: {name} must be (rows, dim), got shape {tuple(t.shape)}")


def gated_norm_fwd(y, z, weight, eps, groups=1, store_rstd=True, cfg=None):
    """y, z: (rows, dim), any strides; weight (dim,) contiguous. Returns out (rows, dim)
    contiguous in y.dtype and rstd (rows, groups) fp32 (None unless store_rstd)."""
    _check_rows("y", y), _check_rows("z", z)
    n_rows, dim = y.shape
    cfg = cfg or gated_norm_config(dim, y.device, element_size=y.element_size())
    out = _empty(n_rows, dim, device=y.device, dtype=y.dtype)
    rstd = _empty(n_rows, groups, device=y.device, dtype=torch.float32) if store_rstd else None
    _gated_norm_fwd_kernel[(cdiv(n_rows, cfg["BLOCK_M"]),)](
        y, z, weight, out, rstd if store_rstd else out, n_rows, dim, dim // groups,
        *y.stride(), *z.stride(), out.stride(0), eps, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], GROUPS=groups, STORE_RSTD=store_rstd, num_warps=cfg["num_warps"])
    return out, rstd


def gated_norm_bwd(y, z, weight, rstd, dout, need_dw=True, dy=None, dz=None, cfg=None):
    """y, z: (rows, dim), any strides; dout (rows, dim) with unit column stride; rstd (rows,
    groups) fp32. Returns dy (y.dtype) and dz (z.dtype), written where given (any strides)
    else new contiguous tensors, and dweight (fp32 sum; None
    unless need_dw)."""
    n_rows, dim = y.shape
    groups = rstd.shape[1]
    cfg = cfg or gated_norm_config(dim, y.device, backward=True, element_size=y.element_size())
    n_tiles = cdiv(n_rows, cfg["BLOCK_M"])
    n_prog = _n_programs(cfg, n_tiles, y.device)
    dy = _empty(n_rows, dim, device=y.device, dtype=y.dtype) if dy is None else dy
    dz = _empty(n_rows, dim, device=z.device, dtype=z.dtype) if dz is None else dz
    partial = _empty(n_prog, dim, device=y.device, dtype=torch.float32) if need_dw else None
    _gated_norm_bwd_kernel[(n_prog,)](
        y, z, weight, dout, rstd, dy, dz, partial if need_dw else dy, n_rows, dim, dim // groups,
        n_tiles, *y.stride(), *z.stride(), dout.stride(0), *dy.stride(), *dz.stride(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUPS=groups, HAS_DW=need_dw,
        num_warps=cfg["num_warps"])
    return dy, dz, partial.sum(0) if need_dw else None


class GatedRMSNormFn(torch.autograd.Function):
    """Fused gated RMSNorm; arguments and shapes as `gated_rms_norm_ref`. Saves y, z and rstd."""

    @staticmethod
    def forward(ctx, y, z, weight, eps, groups):
        shape = y.shape
        y2, z2, w = y.reshape(-1, shape[-1]), z.reshape(-1, shape[-1]), weight.contiguous()
        out, rstd = gated_norm_fwd(y2, z2, w, eps, groups)
        ctx.save_for_backward(y2, z2, w, rstd)
        ctx.shape, ctx.w_dtype = shape, weight.dtype
        return out.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        y2, z2, w, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[2]
        dy, dz, dw = gated_norm_bwd(y2, z2, w, rstd, unit_last_stride(dout.reshape(y2.shape)),
                                    need_dw)
        return (dy.view(ctx.shape), dz.view(ctx.shape), dw.to(ctx.w_dtype) if need_dw else None,
                None, None)


def gated_rms_norm_triton(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                          eps: float = 1e-5, groups: int = 1) -> torch.Tensor:
    """Fused gated RMSNorm; arguments, shapes and result as `gated_rms_norm_ref`."""
    check_gated_args(z, weight, groups, y)
    if y.numel() == 0 or y.shape[-1] > MAX_GATED_DIM or y.dtype == torch.float64:
        return gated_rms_norm_ref(y, z, weight, eps, groups)
    if needs_autograd(y, z, weight):
        return GatedRMSNormFn.apply(y, z, weight, eps, groups)
    shape = y.shape
    out, _ = gated_norm_fwd(y.reshape(-1, shape[-1]), z.reshape(-1, shape[-1]), weight.contiguous(),
                            eps, groups, store_rstd=False)
    return out.view(shape)
