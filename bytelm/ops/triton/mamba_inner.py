"""The mixer between its two projections as one autograd node, on the Triton kernels:
conv + SiLU -> x_proj -> dt_proj -> selective scan, from in_proj's channel-major output xz.

As separate autograd ops (bytelm.modules.mamba on the reference backends) the backward pays for
glue that one node avoids (90M model, 8 x 8192, per layer; benchmarks/NOTES.md, "Mixer glue"):
- autograd joins the gradients of the x / z halves of xz with a cat (2 x 400 MB): here the conv
  and scan backward write them into the two halves of one buffer;
- the same for x_dbl's dt / B / C rows (small): written into one buffer;
- the gradient of the conv output, used by the scan and by x_proj, is summed by a separate
  bf16 add (600 MB): here the conv backward reads both and sums them in fp32 (no rounding of
  the sum).
Same maths and saved tensors as the separate ops (the conv output, x_dbl, delta, packed B / C
where the scan backward reads the forward's packing, the scan checkpoints; weights in the
autocast dtype).
"""

from __future__ import annotations

import torch

from bytelm.ops.backend import needs_autograd
from bytelm.ops.channel_major import _autocast, weight_grad
from bytelm.ops.triton.causal_conv1d import conv_bwd, conv_fwd
from bytelm.ops.triton.selective_scan import (backward_config, forward_config, pack_bc_pair,
                                                saved_bc, scan_bwd, scan_fwd, stack_bc,
                                                unpack_bc)


def _per_row(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(channels, batch * length) -> (batch, channels, length) view."""
    return t.view(t.shape[0], batch, -1).transpose(0, 1)


def _cm(t: torch.Tensor) -> torch.Tensor:
    """(batch, channels, length) view of channel-major storage -> (channels, batch * length) view.
    A view, never a copy: the backward adds into it in place."""
    return t.transpose(0, 1).view(t.shape[1], -1)


class MambaInnerFn(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias,
                batch, dt_rank, need_grad):
        ctx.weight_dtypes = x_proj_weight.dtype, dt_proj_weight.dtype
        x_proj_weight, dt_proj_weight = _autocast(x_proj_weight, dt_proj_weight)
        d_inner, nstate = A.shape
        x_cm, z_cm = xz[:d_inner], xz[d_inner:]
        conv_weight2d = conv_weight.reshape(d_inner, -1)
        x = conv_fwd(_per_row(x_cm, batch), conv_weight2d, conv_bias, silu=True)
        x_dbl = x_proj_weight @ _cm(x)                                   # (r + 2n, b l)
        dt_low, B, C = x_dbl.split([dt_rank, nstate, nstate])
        delta = _per_row(dt_proj_weight @ dt_low, batch)
        cfg = forward_config(nstate, *x.shape, x.device, input_dtype=x.dtype)
        Bp, Cp = pack_bc_pair(_per_row(B, batch), _per_row(C, batch), cfg)  # one copy
        y, _, ckpt = scan_fwd(x, delta, A, Bp, Cp, D, _per_row(z_cm, batch), dt_bias,
                              delta_softplus=True, store_ckpt=need_grad, cfg=cfg)
        if need_grad:
            # the backward's B and C: these, or packed again from x_dbl's rows in its dtype
            ctx.cfg_b = dict(backward_config(nstate, batch, d_inner, x.device), T=cfg["T"])
            Bp, Cp = saved_bc(Bp, Cp, B, C, ctx.cfg_b)
            ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D,
                                  dt_bias, x, x_dbl, delta, Bp, Cp, ckpt)
            ctx.batch, ctx.dt_rank, ctx.t_chunk = batch, dt_rank, cfg["T"]
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, x, x_dbl,
         delta, Bp, Cp, ckpt) = ctx.saved_tensors
        batch, dt_rank = ctx.batch, ctx.dt_rank
        d_inner, nstate = A.shape
        dxz = torch.empty_like(xz)
        dx_cm, dz_cm = dxz[:d_inner], dxz[d_inner:]
        if Bp is None:
            _, B, C = x_dbl.split([dt_rank, nstate, nstate])
            Bp, Cp = pack_bc_pair(_per_row(B, batch), _per_row(C, batch), ctx.cfg_b)
        du, ddelta, dA, dBCp, dD, _, ddt_bias, _ = scan_bwd(
            x, delta, A, Bp, Cp, D, _per_row(xz[d_inner:], batch), dt_bias, True, ckpt,
            ctx.t_chunk, dy, None, need_dh0=False, cfg=ctx.cfg_b, dz=_per_row(dz_cm, batch))
        del Bp, Cp  # a second packing (~8 MB a layer at 8 x 8192) need not outlive the scan
        dx_dbl = torch.empty_like(x_dbl)
        ddt_low, dB, dC = dx_dbl.split([dt_rank, nstate, nstate])
        length = x.shape[2]
        dBC = stack_bc(_per_row(dB, batch), _per_row(dC, batch))  # rows of one buffer: one copy
        if dBC is not None:
            unpack_bc(dBCp, nstate, length, out=dBC)
        else:
            for g, out in zip(dBCp, (dB, dC)):
                unpack_bc(g, nstate, length, out=_per_row(out, batch))
        ddelta_cm = _cm(ddelta)
        torch.matmul(dt_proj_weight.t(), ddelta_cm, out=ddt_low)
        x_proj_dtype, dt_proj_dtype = ctx.weight_dtypes
        ddt_proj_weight = weight_grad(ddelta_cm, x_dbl[:dt_rank].t(), dt_proj_dtype)
        dx_proj_weight = weight_grad(dx_dbl, _cm(x).t(), x_proj_dtype)
        # x feeds x_proj and the scan: the conv backward sums both gradients as it reads them
        # (an in-place addmm_ into du ran at half the memory bandwidth: benchmarks/NOTES.md)
        du_xproj = x_proj_weight.t() @ dx_dbl
        _, dconv_weight, dconv_bias = conv_bwd(
            _per_row(xz[:d_inner], batch), conv_weight.reshape(d_inner, -1), conv_bias, du,
            silu=True, dx=_per_row(dx_cm, batch), dout2=_per_row(du_xproj, batch))
        return (dxz, dconv_weight.view_as(conv_weight).to(conv_weight.dtype),
                dconv_bias.to(conv_bias.dtype) if conv_bias is not None else None,
                dx_proj_weight, ddt_proj_weight, dA, dD, ddt_bias, None, None, None)


def mamba_inner_triton(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias,
                       batch: int, dt_rank: int) -> torch.Tensor:
    """xz: (2 d_inner, batch * length) channel-major (x rows, then z rows); conv_weight
    (d_inner, 1, width), conv_bias (d_inner,) or None; x_proj_weight (dt_rank + 2 N, d_inner);
    dt_proj_weight (d_inner, dt_rank); A (d_inner, N), D, dt_bias (d_inner,) fp32.
    Returns y (batch, d_inner, length), a view of channel-major storage: the scan of
    silu(conv(x)) with dt = softplus(dt_proj(dt rows of x_proj) + dt_bias), gated by silu(z)."""
    params = (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias)
    # without autograd (evaluation) no checkpoints are stored
    return MambaInnerFn.apply(*params, batch, dt_rank, needs_autograd(*params))
