"""The Mamba-2 mixer between its projections as one autograd node, on the Triton kernels:
causal conv + SiLU over xBC -> SSD scan -> RMSNorm gated by SiLU(z), from in_proj's outputs
(`linear_rows_and_cm`: z as rows, x, B, C and dt channel-major) to out_proj's input.

As separate autograd ops (the conv's and the scan's), the gradients of in_proj's xBC and dt rows
come back as separate tensors that autograd joins by a cat (with z's rows then, a 3224 x
65,536 copy for the 90M model: 5 ms of its 2 x 32768 step on the H200,
benchmarks/results/profile-h200.md, twenty-first session). Here the scan's backward writes
ddt, and the conv's backward dxBC, straight into the rows of one buffer laid out like
in_proj's channel-major output. The kernels, the maths and the saved tensors are the
separate ops' (z, in_proj's channel-major output, the conv's output, the chunk states, the
scan's output and the norm's rstd).

The gate is the norm's, not the scan's (ops/triton/gated_norm.py says why), and z comes as rows
(positions, d_inner), not channel-major: the norm reads and writes whole rows, and a
channel-major z made its backward take 4.8 ms a layer in the 90M step, against 0.39 ms for
rows (benchmarks/NOTES.md, twenty-second session).
"""

from __future__ import annotations

import torch

from bytelm.ops.rms_norm import check_gated_args
from bytelm.ops.ssd import check_ssd_args, split_xbc, split_xbcdt
from bytelm.ops.triton.causal_conv1d import check_triton_conv_args, conv_bwd, conv_fwd
from bytelm.ops.triton.gated_norm import gated_norm_bwd, gated_norm_fwd
from bytelm.ops.triton.layout import unit_last_stride
from bytelm.ops.triton.ssd import check_offsets, dense_like, ssd_bwd, ssd_fwd


def _views(xbcdt: torch.Tensor, batch: int, heads: int):
    """split_xbcdt's views as the kernels take them: xBC (batch, conv_dim, length) and dt
    (batch, length, heads)."""
    xbc, dt = split_xbcdt(xbcdt, batch, xbcdt.shape[1] // batch, heads)
    return xbc.transpose(1, 2), dt


class Mamba2InnerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, xbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, eps, batch,
                head_dim, groups, dstate):
        heads = A.shape[0]
        xbc_in, dt = _views(xbcdt, batch, heads)
        xbc = conv_fwd(xbc_in, conv_weight.reshape(conv_weight.shape[0], -1), conv_bias, True)
        x, B, C = split_xbc(xbc.transpose(1, 2), head_dim, groups, dstate)
        y, _, states, decay = ssd_fwd(x, dt, A, B, C, D, None, dt_bias, True, None)
        d_inner = heads * head_dim
        out, rstd = gated_norm_fwd(y.view(-1, d_inner), z, norm_weight.contiguous(), eps, groups)
        ctx.save_for_backward(z, xbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, xbc,
                              states, decay, y, rstd)
        ctx.shape = (batch, head_dim, groups, dstate)
        return out.view(batch, -1, d_inner)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        (z, xbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, xbc, states, decay, y,
         rstd) = ctx.saved_tensors
        batch, head_dim, groups, dstate = ctx.shape
        heads = A.shape[0]
        xbc_in, dt = _views(xbcdt, batch, heads)
        dxbcdt = dense_like(xbcdt)  # every row is written below
        dxbc_in, ddt = _views(dxbcdt, batch, heads)
        dy, dz, dnorm_w = gated_norm_bwd(
            y.view(z.shape), z, norm_weight.contiguous(), rstd,
            unit_last_stride(dout.reshape(z.shape)), need_dw=ctx.needs_input_grad[7])
        xbc_t = xbc.transpose(1, 2)
        dxbc = dense_like(xbc_t)  # the conv output's gradient, in its (batch, conv_dim, length) layout
        dx, dB, dC = split_xbc(dxbc, head_dim, groups, dstate)
        x, B, C = split_xbc(xbc_t, head_dim, groups, dstate)
        _, _, dA, _, _, dD, _, dbias, _ = ssd_bwd(
            x, dt, A, B, C, D, None, dt_bias, True, states, decay, dy.view(y.shape), None,
            dx=dx, dB=dB, dC=dC, ddt=ddt)
        width = conv_weight.shape[-1]
        _, dw, db = conv_bwd(xbc_in, conv_weight.reshape(-1, width), conv_bias,
                             dxbc.transpose(1, 2), silu=True, dx=dxbc_in)
        return (dz, dxbcdt, dw.view_as(conv_weight).to(conv_weight.dtype),
                db.to(conv_bias.dtype) if conv_bias is not None else None, dA,
                dD if D is not None else None, dbias if dt_bias is not None else None,
                dnorm_w.to(norm_weight.dtype) if dnorm_w is not None else None,
                None, None, None, None, None)


def mamba2_inner_triton(z, xbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight,
                        eps: float, batch: int, head_dim: int, n_groups: int,
                        d_state: int) -> torch.Tensor:
    """z: (batch * length, d_inner) rows with unit column stride; xbcdt: (conv_dim + heads,
    batch * length) channel-major (x, B, C rows, then dt), conv_dim = d_inner + 2 n_groups
    d_state; conv_weight (conv_dim, 1, width), conv_bias (conv_dim,) or None; A, D, dt_bias
    (heads,) fp32; norm_weight (d_inner,). Returns (batch, length, d_inner): y = the SSD scan
    of x, B, C = silu(conv(xBC)) with dt = softplus(dt + dt_bias), plus D x
    (bytelm.ops.ssd.ssd_xbc_ref after the conv), then gated_rms_norm_ref(y, z, norm_weight,
    eps, n_groups)."""
    heads = A.shape[0]
    positions = xbcdt.shape[1]
    if positions == 0 or positions % batch:
        raise ValueError(f"mamba2_inner: {positions} positions are not {batch} rows of one "
                         f"step or more")
    if z.shape != (positions, heads * head_dim) or z.stride(-1) != 1:
        raise ValueError(f"mamba2_inner: z must be ({positions}, {heads * head_dim}) rows with "
                         f"unit column stride, got shape {tuple(z.shape)}, strides {z.stride()}")
    xbc_in, dt = _views(xbcdt, batch, heads)
    check_triton_conv_args(xbc_in, conv_weight, conv_bias, "silu")
    x, B, C = split_xbc(xbc_in.transpose(1, 2), head_dim, n_groups, d_state)
    check_ssd_args(x, dt, A, B, C, D, None, dt_bias, None)
    check_gated_args(z, norm_weight, n_groups)
    check_offsets(z, xbc_in, dt)  # the kernels index each view from its own start
    return Mamba2InnerFn.apply(z, xbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, eps,
                               batch, head_dim, n_groups, d_state)
