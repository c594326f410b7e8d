"""Linear layers into and out of channel-major storage, with copy-free gradients.

The Mamba mixer works on (channels, positions) matrices, positions = batch x length (the
layout mamba_ssm uses, which the conv and scan kernels read in place). Plain autograd of
`W @ x.t()` would hand back the gradient of x as the transpose of a (in, positions) matrix, and
the next op would copy it; these functions return every gradient in its input's own layout.

    linear_to_cm(x, W, b)   : x (positions, in) rows  -> (out, positions)   y = W x^T + b
    linear_from_cm(x, W, b) : x (in, positions) cm    -> (positions, out)   y = x^T W^T + b
    linear_rows_and_cm(x, W, b, k): x (positions, in) -> the first k outputs as rows
                              (positions, k) and the rest channel-major (out - k, positions)

All run their matmuls under the caller's autocast, like F.linear.
"""

from __future__ import annotations

import torch


def _autocast(*tensors):
    """The tensors in the autocast dtype when autocast is on (what F.linear would multiply and
    save), else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def weight_grad(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b (2-D) as a parameter's gradient, in the parameter's dtype. From bf16 / fp16
    operands on CUDA into an fp32 parameter, cuBLAS writes fp32 itself (torch.mm's out_dtype):
    the gradient is not rounded to bf16 first, and autograd adds no cast kernel for it (96 casts,
    ~0.5 ms of a 90M 8 x 8192 step: benchmarks/NOTES.md, sixteenth session)."""
    if a.dtype == dtype:
        return a @ b
    if dtype == torch.float32 and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(dtype)


class _LinearToCM(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias):
        ctx.weight_dtype = weight.dtype
        x, weight = _autocast(x, weight)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        y = weight @ x.t()
        return y if bias is None else y + bias[:, None].to(y.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):  # grad: (out, positions)
        x, weight = ctx.saved_tensors
        dx = grad.t() @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None  # (positions, in)
        dw = weight_grad(grad, x.to(grad.dtype), ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        db = grad.sum(1).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class _LinearFromCM(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x_cm, weight, bias):
        ctx.weight_dtype = weight.dtype
        x_cm, weight = _autocast(x_cm, weight)
        ctx.save_for_backward(x_cm, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        y = x_cm.t() @ weight.t()
        return y if bias is None else y + bias.to(y.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):  # grad: (positions, out)
        x_cm, weight = ctx.saved_tensors
        dx = weight.t().to(grad.dtype) @ grad.t() if ctx.needs_input_grad[0] else None  # (in, positions)
        dw = (weight_grad(grad.t(), x_cm.t().to(grad.dtype), ctx.weight_dtype)     # (out, in)
              if ctx.needs_input_grad[1] else None)
        db = grad.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class _LinearRowsAndCM(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, k):
        ctx.weight_dtype, ctx.k = weight.dtype, k
        x, weight = _autocast(x, weight)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        rows, cm = x @ weight[:k].t(), weight[k:] @ x.t()
        if bias is not None:
            rows, cm = rows + bias[:k].to(rows.dtype), cm + bias[k:, None].to(cm.dtype)
        return rows, cm

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_rows, d_cm):  # (positions, k), (out - k, positions)
        x, weight = ctx.saved_tensors
        k, dtype = ctx.k, d_rows.dtype
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # the second product added in place by the matmul itself
            # (an out-of-place addmm first copies its input: 47 us a layer at 65536 x 768)
            dx = (d_rows @ weight[:k].to(dtype)).addmm_(d_cm.t(), weight[k:].to(dtype))
        if ctx.needs_input_grad[1]:
            xg = x.to(dtype)
            dw = torch.cat([weight_grad(d_rows.t(), xg, ctx.weight_dtype),
                            weight_grad(d_cm, xg, ctx.weight_dtype)])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = torch.cat([d_rows.sum(0), d_cm.sum(1)]).to(ctx.bias_dtype)
        return dx, dw, db, None


def linear_rows_and_cm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int):
    """x: (positions, in); weight: (out, in); bias: (out,) or None -> (x W[:k]^T + b[:k]
    (positions, k) contiguous, W[k:] x^T + b[k:] (out - k, positions) contiguous): one layer's
    outputs for two consumers, each in the layout it reads (the Mamba-2 mixer: z as rows for
    its norm, x, B, C and dt channel-major for the conv and scan). The backward sums both
    products into x's gradient by one addmm and returns the weight's gradient whole."""
    out, width = weight.shape
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"linear_rows_and_cm: x must be (positions, {width}) for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"linear_rows_and_cm: bias of shape {tuple(bias.shape)} for {out} outputs")
    if not 0 < k < out:
        raise ValueError(f"linear_rows_and_cm: split {k} must leave outputs on both sides of {out}")
    return _LinearRowsAndCM.apply(x, weight, bias, k)


def linear_to_cm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x: (positions, in); weight: (out, in); bias: (out,) -> (out, positions) contiguous."""
    return _LinearToCM.apply(x, weight, bias)


def linear_from_cm(x_cm: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x_cm: (in, positions); weight: (out, in); bias: (out,) -> (positions, out) contiguous."""
    return _LinearFromCM.apply(x_cm, weight, bias)
