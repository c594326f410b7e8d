"""The Mamba-2 mixer between its projections as one autograd node, on the Triton kernels:
causal conv + SiLU over xBC -> SSD scan gated by SiLU(z), from in_proj's channel-major output.

As separate autograd ops (the conv's and the scan's), the gradients of in_proj's z, xBC and dt
rows come back as three tensors that autograd joins by a cat (a 3224 x 65,536 copy for the
90M model: 5 ms of its 2 x 32768 step on the H200, benchmarks/results/profile-h200.md,
twenty-first session). Here the scan's backward writes dz and ddt, and the conv's backward
dxBC, straight into the rows of one buffer laid out like in_proj's output. The kernels, the
maths and the saved tensors are the separate ops' (in_proj's output, the conv's output, the
chunk states).
"""

from __future__ import annotations

import torch

from bytelm.ops.ssd import check_ssd_args, split_xbc, split_zxbcdt
from bytelm.ops.triton.causal_conv1d import check_triton_conv_args, conv_bwd, conv_fwd
from bytelm.ops.triton.ssd import check_offsets, dense_like, ssd_bwd, ssd_fwd


def _rows(zxbcdt: torch.Tensor, batch: int, d_inner: int, heads: int):
    """split_zxbcdt's views as the kernels take them: z (batch, length, heads, head_dim), xBC
    (batch, conv_dim, length) and dt (batch, length, heads)."""
    z, xbc, dt = split_zxbcdt(zxbcdt, batch, d_inner, heads)
    return z.unflatten(-1, (heads, d_inner // heads)), xbc.transpose(1, 2), dt


class Mamba2InnerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, A, D, dt_bias, batch, head_dim, groups,
                dstate):
        heads = A.shape[0]
        z, xbc_in, dt = _rows(zxbcdt, batch, heads * head_dim, heads)
        xbc = conv_fwd(xbc_in, conv_weight.reshape(conv_weight.shape[0], -1), conv_bias, True)
        x, B, C = split_xbc(xbc.transpose(1, 2), head_dim, groups, dstate)
        out, _, states, decay = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, True, None)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, xbc, states, decay)
        ctx.shape = (batch, head_dim, groups, dstate)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        zxbcdt, conv_weight, conv_bias, A, D, dt_bias, xbc, states, decay = ctx.saved_tensors
        batch, head_dim, groups, dstate = ctx.shape
        heads = A.shape[0]
        z, xbc_in, dt = _rows(zxbcdt, batch, heads * head_dim, heads)
        dzxbcdt = dense_like(zxbcdt)  # every row is written below
        dz, dxbc_in, ddt = _rows(dzxbcdt, batch, heads * head_dim, heads)
        xbc_t = xbc.transpose(1, 2)
        dxbc = dense_like(xbc_t)  # the conv output's gradient, in its (batch, conv_dim, length) layout
        dx, dB, dC = split_xbc(dxbc, head_dim, groups, dstate)
        x, B, C = split_xbc(xbc_t, head_dim, groups, dstate)
        _, _, dA, _, _, dD, _, dbias, _ = ssd_bwd(
            x, dt, A, B, C, D, z, dt_bias, True, states, decay, dout, None,
            dx=dx, dB=dB, dC=dC, dz=dz, ddt=ddt)
        width = conv_weight.shape[-1]
        _, dw, db = conv_bwd(xbc_in, conv_weight.reshape(-1, width), conv_bias,
                             dxbc.transpose(1, 2), silu=True, dx=dxbc_in)
        return (dzxbcdt, dw.view_as(conv_weight).to(conv_weight.dtype),
                db.to(conv_bias.dtype) if conv_bias is not None else None, dA,
                dD if D is not None else None, dbias if dt_bias is not None else None,
                None, None, None, None)


def mamba2_inner_triton(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, batch: int,
                        head_dim: int, n_groups: int, d_state: int) -> torch.Tensor:
    """zxbcdt: (d_inner + conv_dim + heads, batch * length) channel-major (z rows, then x, B, C,
    then dt), conv_dim = d_inner + 2 n_groups d_state; conv_weight (conv_dim, 1, width),
    conv_bias (conv_dim,) or None; A, D, dt_bias (heads,) fp32. Returns y (batch, length,
    heads, head_dim): the SSD scan of x, B, C = silu(conv(xBC)) with dt = softplus(dt +
    dt_bias), plus D x, gated by silu(z) (as bytelm.ops.ssd.ssd_xbc_ref after the conv)."""
    heads = A.shape[0]
    if zxbcdt.shape[1] == 0 or zxbcdt.shape[1] % batch:
        raise ValueError(f"mamba2_inner: {zxbcdt.shape[1]} positions are not {batch} rows of one "
                         f"step or more")
    z, xbc_in, dt = _rows(zxbcdt, batch, heads * head_dim, heads)
    check_triton_conv_args(xbc_in, conv_weight, conv_bias, "silu")
    x, B, C = split_xbc(xbc_in.transpose(1, 2), head_dim, n_groups, d_state)
    check_ssd_args(x, dt, A, B, C, D, z, dt_bias, None)
    check_offsets(z, xbc_in, dt)  # the kernels index each view from its own start
    return Mamba2InnerFn.apply(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, batch, head_dim,
                               n_groups, d_state)
