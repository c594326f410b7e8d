"""Fused causal depthwise conv1d + optional SiLU in Triton: forward and backward.

Same maths and shapes as `bytelm.ops.causal_conv1d.causal_conv1d_ref`:
    x           : (batch, dim, length)   fp32 / bf16 / fp16, any strides
    weight      : (dim, width)           width 1..8, any float dtype
    bias        : (dim,) or None
    out         : (batch, dim, length)   x.dtype; x's layout if its steps are adjacent and it
                                         has no gaps (channel-major storage), else contiguous
    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]),  x[t < 0] = 0
Accumulation is fp32. The backward recomputes the pre-activation (nothing but the inputs is
saved) and returns dx in x.dtype, dweight and dbias in the parameters' dtypes.

How the kernels work
--------------------
One program per (block of length, block of channels, batch row); it owns a tile
(BLOCK_D channels, NV chunks, V steps) of the output. The op is memory bound, so each tile is
read once from DRAM and written once, with vector loads along length.

Length-contiguous x (stride 1 along length, the usual case) -- `SHIFT_IN_REGS`: V steps of a
row are one 16-byte vector held by one thread (V = 8 for bf16/fp16, 4 for fp32). A thread
loads its chunk and the chunk before it (two aligned vector loads; the second is an L1 hit,
the neighbour just loaded it), and builds the tap-shifted tiles x[t - s] in registers:
`sum(where(v == j, chunk, -0.0), axis=2)` takes step j out of the in-thread axis and
`where(v == i, column, tile)` puts it back; with V in one thread both fold to register moves
(the same trick as the selective scan's kernels). The backward also loads the chunk after
(dout, and x for the SiLU's derivative at its first width - 1 steps) and shifts the other
way: dx[t] = sum_k weight[k] * g[t + width - 1 - k] with g = dout * silu'(pre).

Any other strides (e.g. x seen through a transpose, length stride = 2 * dim): the forward uses
plain masked loads at t - s, coalesced along whichever dim is contiguous; the backward first
copies x (and dout) to the length-contiguous layout, which costs far less than recomputing the
pre-activation at every shifted step (measured 4x slower on the H200).

Weight and bias gradients: each program sums g * x[t - s] and g over its tile and writes one
fp32 partial per (program, channel, tap) to a (batch * length blocks, dim, width) buffer;
torch sums it afterwards (deterministic, no atomics).

Under TRITON_INTERPRET every call of a @triton.jit function costs milliseconds, so the kernels
inline all their work, unroll over taps and steps with tl.static_range, and reduce with
`tl.reduce(..., _sum_combine)` rather than tl.sum (a jit wrapper).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.standard import _sum_combine as _add  # tl.sum without its jit wrapper

from bytelm.ops.triton.layout import cdiv, empty_output as _empty, is_length_major, next_pow2, sm_count

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_WIDTH = 8


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    DIM, L, sxb, sxd, sxl, sob, sod, sol, swd, swk,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SHIFT_IN_REGS: tl.constexpr,
    FAST: tl.constexpr, BLOCK_D: tl.constexpr, NV: tl.constexpr, V: tl.constexpr,
):
    """Program (length block, channel block, batch row): out over (BLOCK_D, NV * V) steps."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    d_ = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None, None]
    v_ = tl.arange(0, V)[None, None, :]
    t = pid_l * (NV * V) + tl.arange(0, NV)[None, :, None] * V + v_
    mask_d = d_ < DIM
    x_row = x_ptr + pid_b * sxb + d_.to(tl.int64) * sxd

    acc = tl.zeros([BLOCK_D, NV, V], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d_, mask=mask_d, other=0.0).to(tl.float32)
    if SHIFT_IN_REGS:  # this thread's V steps and the V before them
        xm = tl.load(x_row + t * sxl, mask=mask_d & (t < L), other=0.0).to(tl.float32)
        xp = tl.load(x_row + (t - V) * sxl, mask=mask_d & (t >= V) & (t < L + V),
                     other=0.0).to(tl.float32)
    for k in tl.static_range(W):
        S = W - 1 - k  # tap k reads x[t - S]
        wk = tl.load(w_ptr + d_ * swd + k * swk, mask=mask_d, other=0.0).to(tl.float32)
        if SHIFT_IN_REGS:
            xs = xm
            if S > 0:
                for i in tl.static_range(V):
                    if i >= S:
                        col = tl.reduce(tl.where(v_ == i - S, xm, -0.0), 2, _add, keep_dims=True)
                    else:
                        col = tl.reduce(tl.where(v_ == V + i - S, xp, -0.0), 2, _add, keep_dims=True)
                    xs = tl.where(v_ == i, col, xs)
        else:
            xs = tl.load(x_row + (t - S) * sxl, mask=mask_d & (t >= S) & (t < L + S),
                         other=0.0).to(tl.float32)
        acc += wk * xs
    if SILU:
        if FAST:  # __expf and __fdividef: a few ulp, no denormal or range fix-ups
            acc = acc * libdevice.fast_dividef(1.0, 1.0 + libdevice.fast_expf(-acc))
        else:
            acc = acc * tl.fdiv(1.0, 1.0 + tl.exp2(-acc * 1.4426950408889634), ieee_rounding=False)
    out_row = out_ptr + pid_b * sob + d_.to(tl.int64) * sod
    tl.store(out_row + t * sol, acc.to(out_ptr.dtype.element_ty), mask=mask_d & (t < L))


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, g2_ptr, dx_ptr, dw_ptr, db_ptr,
    DIM, L, ITERS, sxb, sxd, sxl, sgb, sgd, sgl, sg2b, sg2d, sdb, sdd, swd, swk,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr,
    HAS_G2: tl.constexpr, BLOCK_D: tl.constexpr, NV: tl.constexpr, V: tl.constexpr,
    KP: tl.constexpr,
):
    """Program (length segment, channel block, batch row): dx over ITERS tiles of
    (BLOCK_D, NV * V) steps, and the segment's sums of dweight (DIM, W) and dbias (DIM,) at
    row (batch row, segment) of dw_ptr / db_ptr. g_ptr is the upstream gradient dout, plus
    g2_ptr's (HAS_G2: a second one, summed in fp32). x and dout are length-contiguous here (the
    wrapper sees to it): steps are shifted in registers."""
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    part = pid_b * tl.num_programs(0) + pid_s
    d_ = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)[:, None, None]
    v_ = tl.arange(0, V)[None, None, :]
    k_ = tl.arange(0, KP)[None, None, :]  # slots of the gradient sums: taps 0..W-1, bias at W
    mask_d = d_ < DIM
    x_row = x_ptr + pid_b * sxb + d_.to(tl.int64) * sxd
    g_row = g_ptr + pid_b * sgb + d_.to(tl.int64) * sgd
    g2_row = g2_ptr + pid_b * sg2b + d_.to(tl.int64) * sg2d
    dx_row = dx_ptr + pid_b * sdb + d_.to(tl.int64) * sdd  # dx: x's layout, steps adjacent
    if SILU:
        if HAS_BIAS:
            bias = tl.load(b_ptr + d_, mask=mask_d, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_D, 1, 1], dtype=tl.float32)
    # per-thread running sums of g * x[t - S] (slot k) and g (slot W), summed over lanes at the end
    acc = tl.zeros([BLOCK_D, NV, KP], dtype=tl.float32)
    BL: tl.constexpr = NV * V
    c_lo = pid_s * ITERS
    c_hi = tl.minimum(c_lo + ITERS, tl.cdiv(L, BL))
    for c in range(c_lo, c_hi):
        t = c * BL + tl.arange(0, NV)[None, :, None] * V + v_
        dx = tl.zeros([BLOCK_D, NV, V], dtype=tl.float32)
        xm = tl.load(x_row + t * sxl, mask=mask_d & (t < L), other=0.0).to(tl.float32)
        xp = tl.load(x_row + (t - V) * sxl, mask=mask_d & (t >= V) & (t < L + V),
                     other=0.0).to(tl.float32)
        gm = tl.load(g_row + t * sgl, mask=mask_d & (t < L), other=0.0).to(tl.float32)
        gn = tl.load(g_row + (t + V) * sgl, mask=mask_d & (t + V < L), other=0.0).to(tl.float32)
        if HAS_G2:
            gm += tl.load(g2_row + t, mask=mask_d & (t < L), other=0.0).to(tl.float32)
            gn += tl.load(g2_row + (t + V), mask=mask_d & (t + V < L), other=0.0).to(tl.float32)
        if SILU:
            # this chunk's pre-activation from x[t - S] shifted in registers
            pre = bias + tl.zeros([BLOCK_D, NV, V], dtype=tl.float32)
            for k in tl.static_range(W):
                S = W - 1 - k
                wk = tl.load(w_ptr + d_ * swd + k * swk, mask=mask_d, other=0.0).to(tl.float32)
                xs = xm
                if S > 0:
                    for i in tl.static_range(V):
                        if i >= S:
                            col = tl.reduce(tl.where(v_ == i - S, xm, -0.0), 2, _add, keep_dims=True)
                        else:
                            col = tl.reduce(tl.where(v_ == V + i - S, xp, -0.0), 2, _add, keep_dims=True)
                        xs = tl.where(v_ == i, col, xs)
                pre += wk * xs
            if FAST:
                sig = libdevice.fast_dividef(1.0, 1.0 + libdevice.fast_expf(-pre))
            else:
                sig = tl.fdiv(1.0, 1.0 + tl.exp2(-pre * 1.4426950408889634), ieee_rounding=False)
            gm = gm * sig * (1.0 + pre * (1.0 - sig))
            # the next chunk's first W - 1 steps, a column at a time (dx needs g to t + W - 1)
            if W > 1:
                xn = tl.load(x_row + (t + V) * sxl, mask=mask_d & (t + V < L),
                             other=0.0).to(tl.float32)
                gn_raw = gn
                gn = tl.zeros([BLOCK_D, NV, V], dtype=tl.float32)
                for j in tl.static_range(W - 1):
                    p = bias + tl.zeros([BLOCK_D, NV, 1], dtype=tl.float32)
                    for k in tl.static_range(W):
                        wk = tl.load(w_ptr + d_ * swd + k * swk, mask=mask_d, other=0.0).to(tl.float32)
                        src = j - (W - 1) + k  # step of the next chunk; < 0: this one's end
                        if src >= 0:
                            col = tl.reduce(tl.where(v_ == src, xn, -0.0), 2, _add, keep_dims=True)
                        else:
                            col = tl.reduce(tl.where(v_ == V + src, xm, -0.0), 2, _add, keep_dims=True)
                        p += wk * col
                    if FAST:
                        sj = libdevice.fast_dividef(1.0, 1.0 + libdevice.fast_expf(-p))
                    else:
                        sj = tl.fdiv(1.0, 1.0 + tl.exp2(-p * 1.4426950408889634), ieee_rounding=False)
                    gj = tl.reduce(tl.where(v_ == j, gn_raw, -0.0), 2, _add, keep_dims=True)
                    gn = tl.where(v_ == j, gj * sj * (1.0 + p * (1.0 - sj)), gn)
        # dx[t] = sum_k w[k] * g[t + S]: g shifted the other way, from this chunk and the next
        for k in tl.static_range(W):
            S = W - 1 - k
            wk = tl.load(w_ptr + d_ * swd + k * swk, mask=mask_d, other=0.0).to(tl.float32)
            gs = gm
            if S > 0:
                for i in tl.static_range(V):
                    if i + S < V:
                        col = tl.reduce(tl.where(v_ == i + S, gm, -0.0), 2, _add, keep_dims=True)
                    else:
                        col = tl.reduce(tl.where(v_ == i + S - V, gn, -0.0), 2, _add, keep_dims=True)
                    gs = tl.where(v_ == i, col, gs)
            dx += wk * gs
        # slot k += sum_i g[i] * x[i - S] step by step (one fma each), slot W += sum_i g[i]
        for i in tl.static_range(V):
            gi = tl.reduce(tl.where(v_ == i, gm, -0.0), 2, _add, keep_dims=True)
            acc = tl.where(k_ == W, acc + gi, acc)
            for k in tl.static_range(W):
                S = W - 1 - k
                if i >= S:
                    xi = tl.reduce(tl.where(v_ == i - S, xm, -0.0), 2, _add, keep_dims=True)
                else:
                    xi = tl.reduce(tl.where(v_ == V + i - S, xp, -0.0), 2, _add, keep_dims=True)
                acc = tl.where(k_ == k, acc + gi * xi, acc)
        tl.store(dx_row + t, dx.to(dx_ptr.dtype.element_ty), mask=mask_d & (t < L))
    sums = tl.reduce(acc, 1, _add, keep_dims=True)  # (BLOCK_D, 1, KP)
    tl.store(dw_ptr + (part * DIM + d_) * W + k_, sums, mask=mask_d & (k_ < W))
    tl.store(db_ptr + part * DIM + d_ + k_ * 0, sums, mask=mask_d & (k_ == W))


# --------------------------------------------------------------------------------------------
# launch configuration and wrappers
# --------------------------------------------------------------------------------------------
def conv_config(x: torch.Tensor, width: int, backward: bool = False) -> dict:
    """Tile for a launch on x (batch, dim, length).

    Length-contiguous x: V = one 16-byte vector of steps per thread (at least width - 1, the
    furthest shift), BLOCK_L = NV * V steps (up to 1024), BLOCK_D channels filling ~2048
    elements a program (~1024 in the backward). Other strides (forward only; the backward copies
    x to this layout): V = 1 and a (128 channels x 16 steps) tile. 4 warps. Measured on the H200
    in bf16 (benchmarks/conv1d.py --tune, 8 x 1536 x 8192): 1024 x 2 beat 512 x 8 by 27% in the
    forward, 33% in the backward; 16 x 128 beat 32 x 64 by 2x in the strided forward; in the
    backward 1024 x 1 beat 1024 x 2 by 6% (0.184 / 0.196 ms) and by 9% with a second output
    gradient (0.217 / 0.238 ms; sixteenth session). The backward walks
    ITERS consecutive tiles per program (`bwd_iters`), so that its cross-lane sums for dweight
    and dbias are paid once per segment. FAST: __expf/__fdividef in the SiLU on the GPU (the
    interpreter has neither).
    """
    dim, length = x.shape[1], x.shape[2]
    if x.stride(2) == 1 or length == 1:
        v = max(16 // x.element_size(), next_pow2(max(width - 1, 1)))
        block_l = min(max(next_pow2(length), v), 1024)
        block_d = min(max((1024 if backward else 2048) // block_l, 1), next_pow2(dim))
        cfg = dict(SHIFT_IN_REGS=True, V=v, NV=block_l // v, BLOCK_D=block_d)
    else:
        cfg = dict(SHIFT_IN_REGS=False, V=1, NV=min(next_pow2(length), 16),
                   BLOCK_D=min(next_pow2(dim), 128))
    return dict(cfg, FAST=not _INTERPRET, num_warps=4)


def bwd_iters(n_tiles: int, programs: int, device) -> int:
    """Tiles per backward program: as many as keep >= ~8 programs per SM (at most 8)."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    return max(1, min(8, n_tiles, n_tiles * programs // (8 * sms)))


def _fit_strides(t):
    """Offsets along length are 32-bit in the kernels: make x contiguous when they would not fit
    (length * stride beyond 2**31), which also takes it to the fast, length-contiguous path."""
    return t if t.shape[2] * abs(t.stride(2)) < 2**31 else t.contiguous()


def _out_like(x):
    """Output allocation in x's layout when x's steps are adjacent and it has no gaps (e.g. the
    mixer's channel-major (dim, batch, length) storage, which its next matmul reads in place),
    else contiguous (batch, dim, length)."""
    if is_length_major(x):
        return _empty(like=x)
    return _empty(*x.shape, device=x.device, dtype=x.dtype)


def conv_fwd(x, weight, bias, silu, cfg=None):
    """x: (batch, dim, length); weight: (dim, width); bias: (dim,) or None -> out (batch, dim,
    length) in x.dtype, laid out as `_out_like` says."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    x = _fit_strides(x)
    cfg = cfg or conv_config(x, width)
    cfg = {k: v for k, v in cfg.items() if k != "ITERS"}
    out = _out_like(x)
    grid = (cdiv(length, cfg["NV"] * cfg["V"]), cdiv(dim, cfg["BLOCK_D"]), batch)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        dim, length, *x.stride(), *out.stride(), *weight.stride(),
        W=width, HAS_BIAS=bias is not None, SILU=silu, **cfg)
    return out


def _length_contiguous(t):
    return t if t.stride(2) == 1 or t.shape[2] == 1 else t.contiguous()


def conv_bwd(x, weight, bias, dout, silu, cfg=None, dx=None, dout2=None):
    """Gradients of `conv_fwd`: dx (x.dtype, laid out as `_out_like` says) and the fp32 sums
    dweight (dim, width) and dbias (dim,), the latter None without a bias. x or dout strided
    along length is copied
    to a contiguous layout first: the in-register shifts need whole vectors of steps, and the
    copy costs far less than a backward through shifted loads (4x slower on the H200).
    dx: where to write x's gradient (steps adjacent), e.g. a slice of a larger gradient buffer.
    dout2: a second gradient of the output (same shape), added to dout in fp32 as it is read:
    the output feeding two ops (the mixer's scan and x_proj) needs no separate sum."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    x, dout = _length_contiguous(x), _length_contiguous(dout)
    if dout2 is not None:
        if dout2.shape != dout.shape:
            raise ValueError(f"conv_bwd: dout2 {tuple(dout2.shape)} is not dout's shape "
                             f"{tuple(dout.shape)}")
        dout2 = _length_contiguous(dout2)
    if cfg is None or not cfg.get("SHIFT_IN_REGS", True):
        cfg = conv_config(x, width, backward=True)
    cfg = {k: v for k, v in cfg.items() if k != "SHIFT_IN_REGS"}
    n_tiles = cdiv(length, cfg["NV"] * cfg["V"])
    d_blocks = cdiv(dim, cfg["BLOCK_D"])
    iters = cfg.pop("ITERS", None) or bwd_iters(n_tiles, d_blocks * batch, x.device)
    grid = (cdiv(n_tiles, iters), d_blocks, batch)
    parts = grid[0] * batch
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = _out_like(x) if dx is None else dx
    assert dx.stride(2) == 1 or length == 1
    dw_part = _empty(parts, dim, width, **f32)
    db_part = _empty(parts, dim, **f32)
    g2 = dout if dout2 is None else dout2
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, dout, g2, dx, dw_part, db_part,
        dim, length, iters, *x.stride(), *dout.stride(), g2.stride(0), g2.stride(1),
        dx.stride(0), dx.stride(1), *weight.stride(),
        W=width, HAS_BIAS=bias is not None, SILU=silu, HAS_G2=dout2 is not None,
        KP=next_pow2(width + 1), **cfg)
    return dx, dw_part.sum(0), db_part.sum(0) if bias is not None else None


class CausalConv1dFn(torch.autograd.Function):
    """Fused causal depthwise conv1d (+ SiLU). x: (batch, dim, length); weight: (dim, width);
    bias: (dim,) or None. Saves only the inputs; the backward recomputes the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        out = conv_fwd(x, weight, bias, silu)
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = conv_bwd(x, weight, bias, dout, ctx.silu)
        return (dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None, None)


def check_triton_conv_args(x, weight, bias, activation) -> int:
    """check_conv_args' one-line errors, and a width the kernels take; returns the width."""
    from bytelm.ops.causal_conv1d import check_conv_args

    width = check_conv_args(x, weight, bias, activation)
    if width > MAX_WIDTH:
        raise ValueError(f"causal_conv1d: the Triton kernels support width <= {MAX_WIDTH}, got {width}")
    return width


def causal_conv1d_triton(x, weight, bias=None, activation=None):
    """Fused causal depthwise conv1d; arguments, shapes and result as `causal_conv1d_ref`
    (weight (dim, width) or (dim, 1, width), width <= 8; activation None or "silu")."""
    width = check_triton_conv_args(x, weight, bias, activation)
    if x.numel() == 0:  # nothing to launch: the reference's (empty) result
        from bytelm.ops.causal_conv1d import causal_conv1d_ref
        return causal_conv1d_ref(x, weight, bias, activation)
    return CausalConv1dFn.apply(x, weight.reshape(weight.shape[0], width), bias,
                                activation == "silu")
