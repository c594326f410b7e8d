"""Fused RoPE on attention's q, k, v projection: forward and backward kernels and the autograd op.

Maths and shapes as `bytelm.ops.rotary.qkv_rotary_ref` (the reference beside it):
    qkv          : (batch, length, 3 * n_head * head_dim)   unit stride along the last dim
    cos, sin     : (length, half) fp32, half = head_dim / 2  (`rope_tables`)
    q, k, v      : (batch, length, n_head, head_dim)         contiguous, qkv's dtype

    forward : q[i] = x[i] cos - x[i + half] sin,  q[i + half] = x[i] sin + x[i + half] cos
              (k likewise; v copied)
    backward: dx[i] = dq[i] cos + dq[i + half] sin,  dx[i + half] = dq[i + half] cos - dq[i] sin
              (the inverse rotation), dv copied, all into one d(qkv) (batch, length, 3 * d_model)

A program takes BLOCK_R positions of one head: it loads both halves of q's and k's head rows
and the positions' cos and sin, rotates in fp32 and stores; v's head rows are copied by the same
program. So qkv is read once and q, k, v written once (the reference runs a cast, two chunks,
six products and sums and a concatenation per tensor in fp32, and its backward as many again).
The outputs' (batch, length, n_head, head_dim) layout is what `F.scaled_dot_product_attention`
reads through a transpose, without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bytelm.ops.backend import needs_autograd
from bytelm.ops.triton.layout import (cdiv, empty_output as _empty, next_pow2,
                                      unit_last_stride)

BLOCK_R = 32  # positions a program


@triton.jit
def _rotary_fwd_kernel(QKV, COS, SIN, Q, K, V, n_rows, length, stride_b, stride_l, HALF,
                       D_MODEL, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (i < HALF)[None, :]
    t = rows % length
    src = (QKV + ((rows // length).to(tl.int64) * stride_b + t.to(tl.int64) * stride_l)[:, None]
           + head * 2 * HALF + i[None, :])
    dst = (rows.to(tl.int64) * D_MODEL)[:, None] + head * 2 * HALF + i[None, :]
    cs = t[:, None] * HALF + i[None, :]
    cos = tl.load(COS + cs, mask=mask, other=0.0)
    sin = tl.load(SIN + cs, mask=mask, other=0.0)
    # q (part 0 of the row) and k (part 1): the same rotation
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(Q + dst, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mask)
    tl.store(Q + dst + HALF, (x1 * sin + x2 * cos).to(Q.dtype.element_ty), mask=mask)
    x1 = tl.load(src + D_MODEL, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + D_MODEL + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(K + dst, (x1 * cos - x2 * sin).to(K.dtype.element_ty), mask=mask)
    tl.store(K + dst + HALF, (x1 * sin + x2 * cos).to(K.dtype.element_ty), mask=mask)
    tl.store(V + dst, tl.load(src + 2 * D_MODEL, mask=mask, other=0.0), mask=mask)
    tl.store(V + dst + HALF, tl.load(src + 2 * D_MODEL + HALF, mask=mask, other=0.0), mask=mask)


@triton.jit
def _rotary_bwd_kernel(DQ, DK, DV, COS, SIN, DQKV, n_rows, length,
                       sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, HALF, D_MODEL,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (i < HALF)[None, :]
    b = (rows // length).to(tl.int64)[:, None]
    t = rows % length
    t64 = t.to(tl.int64)[:, None]
    dst = DQKV + (rows.to(tl.int64) * 3 * D_MODEL)[:, None] + head * 2 * HALF + i[None, :]
    cs = t[:, None] * HALF + i[None, :]
    cos = tl.load(COS + cs, mask=mask, other=0.0)
    sin = tl.load(SIN + cs, mask=mask, other=0.0)
    # the gradients arrive as (batch, n_head, length, head_dim) with their own strides
    pq = DQ + b * sq_b + head * sq_h + t64 * sq_l + i[None, :]
    g1 = tl.load(pq, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(pq + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (g1 * cos + g2 * sin).to(DQKV.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (g2 * cos - g1 * sin).to(DQKV.dtype.element_ty), mask=mask)
    pk = DK + b * sk_b + head * sk_h + t64 * sk_l + i[None, :]
    g1 = tl.load(pk, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(pk + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + D_MODEL, (g1 * cos + g2 * sin).to(DQKV.dtype.element_ty), mask=mask)
    tl.store(dst + D_MODEL + HALF, (g2 * cos - g1 * sin).to(DQKV.dtype.element_ty), mask=mask)
    pv = DV + b * sv_b + head * sv_h + t64 * sv_l + i[None, :]
    tl.store(dst + 2 * D_MODEL, tl.load(pv, mask=mask, other=0.0).to(DQKV.dtype.element_ty),
             mask=mask)
    tl.store(dst + 2 * D_MODEL + HALF,
             tl.load(pv + HALF, mask=mask, other=0.0).to(DQKV.dtype.element_ty), mask=mask)


def rotary_fwd(qkv, cos, sin, n_head, block_r=BLOCK_R, num_warps=4):
    """qkv (batch, length, 3 * d_model) with unit last stride; cos, sin (length, half) fp32
    contiguous -> q, k, v (batch, length, n_head, head_dim) contiguous in qkv's dtype.
    block_r, num_warps: the tile (benchmarks/transformer_ops.py --tune)."""
    b, length, width = qkv.shape
    d_model = width // 3
    half = d_model // n_head // 2
    q, k, v = (_empty(b, length, n_head, 2 * half, device=qkv.device, dtype=qkv.dtype)
               for _ in range(3))
    grid = (cdiv(b * length, block_r), n_head)
    _rotary_fwd_kernel[grid](qkv, cos, sin, q, k, v, b * length, length, qkv.stride(0),
                             qkv.stride(1), half, d_model, BLOCK_R=block_r,
                             BLOCK_H=next_pow2(half), num_warps=num_warps)
    return q, k, v


def rotary_bwd(dq, dk, dv, cos, sin, dtype, block_r=BLOCK_R, num_warps=4):
    """dq, dk, dv (batch, n_head, length, head_dim), any strides -> d(qkv) (batch, length,
    3 * d_model) contiguous in dtype."""
    dq, dk, dv = unit_last_stride(dq), unit_last_stride(dk), unit_last_stride(dv)
    b, n_head, length, head_dim = dq.shape
    d_model = n_head * head_dim
    dqkv = _empty(b, length, 3 * d_model, device=dq.device, dtype=dtype)
    grid = (cdiv(b * length, block_r), n_head)
    _rotary_bwd_kernel[grid](dq, dk, dv, cos, sin, dqkv, b * length, length,
                             dq.stride(0), dq.stride(1), dq.stride(2),
                             dk.stride(0), dk.stride(1), dk.stride(2),
                             dv.stride(0), dv.stride(1), dv.stride(2), head_dim // 2, d_model,
                             BLOCK_R=block_r, BLOCK_H=next_pow2(head_dim // 2),
                             num_warps=num_warps)
    return dqkv


class QkvRotaryFn(torch.autograd.Function):
    """qkv -> q, k, v, each (batch, length, n_head, head_dim); saves only cos and sin."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head):
        ctx.save_for_backward(cos, sin)
        ctx.dtype = qkv.dtype
        return rotary_fwd(qkv, cos, sin, n_head)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: say so, not zeros
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        # as (batch, n_head, length, head_dim): the layout of the tensors attention read
        dqkv = rotary_bwd(dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), cos, sin,
                          ctx.dtype)
        return dqkv, None, None, None


def qkv_rotary_triton(qkv: torch.Tensor, n_head: int, start: int = 0, theta: float = 10000.0):
    """Fused RoPE; arguments and results as `bytelm.ops.rotary.qkv_rotary_ref`, q, k, v as
    (batch, n_head, length, head_dim) views of (batch, length, n_head, head_dim) tensors."""
    from bytelm.ops.rotary import check_qkv, qkv_rotary_ref, rope_tables

    head_dim = check_qkv(qkv, n_head)
    if qkv.numel() == 0:
        return qkv_rotary_ref(qkv, n_head, start, theta)
    qkv = unit_last_stride(qkv)
    cos, sin = rope_tables(qkv.shape[1], start, head_dim, theta, qkv.device)
    if needs_autograd(qkv):
        q, k, v = QkvRotaryFn.apply(qkv, cos, sin, n_head)
    else:
        q, k, v = rotary_fwd(qkv, cos, sin, n_head)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
