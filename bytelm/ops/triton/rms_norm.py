"""Fused Triton RMSNorm: forward and backward kernels and the autograd op.

Same maths and shapes as `bytelm.ops.rms_norm.rms_norm_ref` (the reference beside it):
    x      : (..., dim)   fp32 / bf16 / fp16, viewed as (rows, dim)
    weight : (dim,)       fp32 (any float dtype; read as fp32)
    y      : (..., dim)   x.dtype
    rstd   : (rows,)      fp32, 1 / sqrt(mean(x32 ** 2) + eps): all the forward saves beside x

    forward : y  = xhat * w                        with xhat = x32 * rstd
    backward: dx = rstd * (dy*w - xhat * mean(dy*w * xhat))
              dw = sum over rows of dy * xhat

The residual add + RMSNorm (`add_rms_norm_ref`) runs the same two kernels with flags on: the
forward reads x and residual once, normalises h = residual + x (fp32) and writes y and h
(residual_out, fp32); the backward reads h, dy and the gradient arriving along the residual
stream, d(residual_out), and writes their sum dh = norm backward + d(residual_out) once per
input that needs it (dx in x's dtype, dresidual in residual's), with dw as for the norm. That
folds the block's `residual + x` and autograd's accumulation of the residual gradient (two
element-wise kernels and an fp32 round trip of the residual stream each) into the norm's passes.
y may be written in a narrower out_dtype (the model's norms under autocast write bf16, what
the next matmul reads: the fp32 result rounded to nearest even, as the cast it replaces); dy
then arrives in that dtype and is read as fp32, the value autograd's cast would give.

How the kernels work
--------------------
A program takes a tile of BLOCK_M whole rows (BLOCK_N = next power of two >= dim columns, the
rest masked) into registers, so x is read once and the row reductions are register/shuffle
sums; all arithmetic is fp32. The forward is one program per tile; without autograd (no_grad,
or no input needing a gradient) it runs outside the autograd op and stores no rstd. The
backward is persistent: a fixed number of programs (a few per SM) each walk tiles pid,
pid + n_programs, ... and keep their share of dw as a (BLOCK_M, BLOCK_N) fp32 accumulator in
registers; at the end each program writes its column sums to one row of a (n_programs, dim)
fp32 buffer that torch sums: no atomics, so dw is deterministic (the same bits every run on a
given GPU). Every element of x, y, dy and dx is read or written exactly once per pass. Rows
wider than MAX_FUSED_DIM (or no rows at all) go to the reference.

Under TRITON_INTERPRET=1 (tests on the CPU) every @triton.jit helper call costs milliseconds, so
the kernels call none; per-program work is written out inline.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bytelm.ops.backend import needs_autograd
from bytelm.ops.triton.layout import (as_rows as _rows, cdiv, empty_output as _empty, next_pow2,
                                      sm_count)

MAX_FUSED_DIM = 16384  # widest row held in registers; wider rows take the reference


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(X, RES, W, Y, RES_OUT, RSTD, n_rows, dim, stride_x, stride_res, stride_y,
                         stride_res_out, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
                         STORE_RSTD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < dim
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the fused add: x becomes residual + x, in fp32
        x += tl.load(RES + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        tl.store(RES_OUT + rows64 * stride_res_out + cols[None, :], x, mask=mask)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / dim + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(X, W, DY, DRES_OUT, RSTD, DX, DRES, DW, n_rows, dim, n_tiles, stride_x,
                         stride_dy, stride_dres_out, stride_dx, stride_dres,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DRES_OUT: tl.constexpr,
                         STORE_DX: tl.constexpr, STORE_DRES: tl.constexpr, HAS_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # this program's share of dw
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # masked rows: xhat = 0
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(xhat * wdy, axis=1) / dim
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DRES_OUT:  # the gradient arriving along the residual stream joins here
            dx += tl.load(DRES_OUT + rows64 * stride_dres_out + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        if STORE_DX:
            tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_DRES:  # the same values again, in the residual input's dtype
            tl.store(DRES + rows64 * stride_dres + cols[None, :], dx.to(DRES.dtype.element_ty),
                     mask=mask)
        if HAS_DW:
            acc += dy * xhat
    if HAS_DW:
        tl.store(DW + pid * dim + cols, tl.sum(acc, axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
def rms_norm_config(dim: int, device: torch.device, backward: bool = False,
                    element_size: int = 4) -> dict:
    """Tile for a launch. BLOCK_N = next power of two >= dim. Forward: num_warps = BLOCK_N / 256
    within [4, 16] (8-16 elements of a row per thread), BLOCK_M rows per program so that a tile
    holds ~8 KB of x. Backward: one row per tile, num_warps = BLOCK_N / 512 within [2, 16] (16
    elements of a row per thread: more loads in flight a thread, a cheaper cross-warp row sum),
    PROGRAMS_PER_SM persistent programs per SM, at most 8 and 32 warps an SM (never more
    programs than tiles). Measured on the H200 at dim 768 and 1024, fp32 and bf16
    (benchmarks/rms_norm.py --tune): forward tiles of 1-8 rows are within 3% of each other.
    The fused add + norm backward at the 90M step's 65536 x 768 (fp32 stream, bf16 dy and dx;
    NOTES.md, thirteenth session): 4 warps, 8 programs an SM (the rule before) 0.303 ms, 2
    warps 0.218 (16 programs 0.222, 32 0.228; 2-row tiles 0.230-0.236; 8 warps 0.272).
    Under the interpreter: big tiles (few programs; the cost there is per program) and 3
    backward programs, so that the persistent loop and uneven splits are exercised."""
    block_n = next_pow2(max(dim, 1))
    if device.type != "cuda":
        return dict(BLOCK_N=block_n, BLOCK_M=max(1, min(64, 8192 // block_n)), num_warps=4,
                    programs=3)
    if backward:
        num_warps = min(16, max(2, block_n // 512))
        return dict(BLOCK_N=block_n, BLOCK_M=1, num_warps=num_warps,
                    PROGRAMS_PER_SM=max(1, min(8, 32 // num_warps)))
    return dict(BLOCK_N=block_n, BLOCK_M=max(1, 8192 // (block_n * element_size)),
                num_warps=min(16, max(4, block_n // 256)))


def _n_programs(cfg, n_tiles, device) -> int:
    if "programs" in cfg:
        n = cfg["programs"]
    else:
        n = cfg["PROGRAMS_PER_SM"] * sm_count(device)
    return max(1, min(n, n_tiles))


def rms_norm_fwd(x, weight, eps, store_rstd=True, cfg=None):
    """x: (rows, dim) with unit column stride; weight: (dim,) contiguous.
    Returns y (rows, dim) contiguous in x.dtype and rstd (rows,) fp32 (None unless store_rstd)."""
    n_rows, dim = x.shape
    cfg = cfg or rms_norm_config(dim, x.device, element_size=x.element_size())
    y = _empty(n_rows, dim, device=x.device, dtype=x.dtype)
    rstd = _empty(n_rows, device=x.device, dtype=torch.float32) if store_rstd else None
    grid = (cdiv(n_rows, cfg["BLOCK_M"]),)
    _rms_norm_fwd_kernel[grid](
        x, x, weight, y, y, rstd if store_rstd else y, n_rows, dim, x.stride(0), 0, y.stride(0), 0,
        eps, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_RESIDUAL=False,
        STORE_RESIDUAL=False, STORE_RSTD=store_rstd, num_warps=cfg["num_warps"])
    return y, rstd


def rms_norm_bwd(x, weight, rstd, dy, need_dw=True, cfg=None):
    """x, dy: (rows, dim) with unit column stride; weight: (dim,); rstd: (rows,) fp32.
    Returns dx (rows, dim) contiguous in x.dtype and dweight (dim,) in weight.dtype (None
    unless need_dw)."""
    n_rows, dim = x.shape
    cfg = cfg or rms_norm_config(dim, x.device, backward=True, element_size=x.element_size())
    n_tiles = cdiv(n_rows, cfg["BLOCK_M"])
    n_prog = _n_programs(cfg, n_tiles, x.device)
    dx = _empty(n_rows, dim, device=x.device, dtype=x.dtype)
    partial = _empty(n_prog, dim, device=x.device, dtype=torch.float32) if need_dw else None
    _rms_norm_bwd_kernel[(n_prog,)](
        x, weight, dy, dy, rstd, dx, dx, partial if need_dw else dx, n_rows, dim, n_tiles,
        x.stride(0), dy.stride(0), 0, dx.stride(0), 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_DRES_OUT=False, STORE_DX=True,
        STORE_DRES=False, HAS_DW=need_dw, num_warps=cfg["num_warps"])
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


class RMSNormFn(torch.autograd.Function):
    """Fused RMSNorm; arguments and shapes as `rms_norm_ref`. Saves x and rstd (fp32 per row)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2, w = _rows(x), weight.contiguous()
        y, rstd = rms_norm_fwd(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(x2, w, rstd, _rows(dy), need_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused RMSNorm; arguments, shapes and result as `rms_norm_ref`."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    if x.numel() == 0 or x.shape[-1] > MAX_FUSED_DIM:
        from bytelm.ops.rms_norm import rms_norm_ref
        return rms_norm_ref(x, weight, eps)
    if needs_autograd(x, weight):
        return RMSNormFn.apply(x, weight, eps)
    # no autograd: the forward alone, without rstd
    return rms_norm_fwd(_rows(x), weight.contiguous(), eps, store_rstd=False)[0].view(x.shape)


# --------------------------------------------------------------------------------------------
# residual add + RMSNorm (the same kernels with the residual flags on)
# --------------------------------------------------------------------------------------------
def add_rms_norm_fwd(x, residual, weight, eps, out_dtype, store_rstd=True, cfg=None):
    """x, residual (or None): (rows, dim) with unit column stride; weight: (dim,) contiguous.
    Returns y (rows, dim) in out_dtype, residual_out = residual + x (rows, dim) fp32 and rstd
    (rows,) fp32 (None unless store_rstd); all contiguous."""
    n_rows, dim = x.shape
    cfg = cfg or rms_norm_config(dim, x.device, element_size=4)  # tiles of the fp32 sum
    y = _empty(n_rows, dim, device=x.device, dtype=out_dtype)
    residual_out = _empty(n_rows, dim, device=x.device, dtype=torch.float32)
    rstd = _empty(n_rows, device=x.device, dtype=torch.float32) if store_rstd else None
    has_res = residual is not None
    grid = (cdiv(n_rows, cfg["BLOCK_M"]),)
    _rms_norm_fwd_kernel[grid](
        x, residual if has_res else x, weight, y, residual_out, rstd if store_rstd else y,
        n_rows, dim, x.stride(0), residual.stride(0) if has_res else 0, y.stride(0),
        residual_out.stride(0), eps, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_RESIDUAL=has_res, STORE_RESIDUAL=True, STORE_RSTD=store_rstd,
        num_warps=cfg["num_warps"])
    return y, residual_out, rstd


def add_rms_norm_bwd(residual_out, weight, rstd, dy, dresidual_out=None, dx_dtype=None,
                     dresidual_dtype=None, need_dw=True, cfg=None):
    """residual_out, dy, dresidual_out (or None): (rows, dim) with unit column stride, dy in
    any float dtype (read as fp32); weight: (dim,); rstd: (rows,) fp32. One pass gives
    d(residual_out) = norm backward + dresidual_out, written as dx in dx_dtype and as dresidual
    in dresidual_dtype (each None: not written), and dweight in weight.dtype (None unless
    need_dw)."""
    n_rows, dim = residual_out.shape
    dev = residual_out.device
    cfg = cfg or rms_norm_config(dim, dev, backward=True, element_size=4)
    n_tiles = cdiv(n_rows, cfg["BLOCK_M"])
    n_prog = _n_programs(cfg, n_tiles, dev)
    dx = _empty(n_rows, dim, device=dev, dtype=dx_dtype) if dx_dtype else None
    dres = _empty(n_rows, dim, device=dev, dtype=dresidual_dtype) if dresidual_dtype else None
    partial = _empty(n_prog, dim, device=dev, dtype=torch.float32) if need_dw else None
    has_dres_out = dresidual_out is not None
    _rms_norm_bwd_kernel[(n_prog,)](
        residual_out, weight, dy, dresidual_out if has_dres_out else dy, rstd,
        dx if dx is not None else dy, dres if dres is not None else dy,
        partial if need_dw else dy, n_rows, dim, n_tiles, residual_out.stride(0), dy.stride(0),
        dresidual_out.stride(0) if has_dres_out else 0, dx.stride(0) if dx is not None else 0,
        dres.stride(0) if dres is not None else 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_DRES_OUT=has_dres_out,
        STORE_DX=dx is not None, STORE_DRES=dres is not None, HAS_DW=need_dw,
        num_warps=cfg["num_warps"])
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dres, dw


class AddRMSNormFn(torch.autograd.Function):
    """Fused residual add + RMSNorm; arguments and shapes as `add_rms_norm_ref`. Saves
    residual_out (fp32, also an output) and rstd; the backward takes the gradients of y and of
    residual_out (None when residual_out is not used further, e.g. after the last block)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        w = weight.contiguous()
        res2 = _rows(residual) if residual is not None else None
        y, residual_out, rstd = add_rms_norm_fwd(_rows(x), res2, w, eps, out_dtype)
        ctx.save_for_backward(residual_out, w, rstd)
        ctx.set_materialize_grads(False)  # no zero tensor for an unused residual_out
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
        return y.view(x.shape), residual_out.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dresidual_out):
        residual_out, w, rstd = ctx.saved_tensors
        need_dx, need_dres, need_dw = ctx.needs_input_grad[:3]
        dy = torch.zeros_like(residual_out) if dy is None else _rows(dy)
        dx, dres, dw = add_rms_norm_bwd(
            residual_out, w, rstd, dy, None if dresidual_out is None else _rows(dresidual_out),
            dx_dtype=ctx.x_dtype if need_dx else None,
            dresidual_dtype=ctx.residual_dtype if need_dres else None, need_dw=need_dw)
        shape = ctx.x_shape
        return (dx.view(shape) if dx is not None else None,
                dres.view(shape) if dres is not None else None, dw, None, None)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float = 1e-5, out_dtype: torch.dtype | None = None):
    """Fused residual add + RMSNorm; arguments, shapes and results as `add_rms_norm_ref`."""
    from bytelm.ops.rms_norm import _check_add_norm, add_rms_norm_ref, stream_dtype

    _check_add_norm(x, residual, weight)
    if x.numel() == 0 or x.shape[-1] > MAX_FUSED_DIM or stream_dtype(x, residual) != torch.float32:
        return add_rms_norm_ref(x, residual, weight, eps, out_dtype)
    out_dtype = out_dtype or x.dtype
    if needs_autograd(x, residual, weight):
        return AddRMSNormFn.apply(x, residual, weight, eps, out_dtype)
    # no autograd: the forward alone, without rstd
    res2 = _rows(residual) if residual is not None else None
    y, residual_out, _ = add_rms_norm_fwd(_rows(x), res2, weight.contiguous(), eps, out_dtype,
                                          store_rstd=False)
    return y.view(x.shape), residual_out.view(x.shape)
