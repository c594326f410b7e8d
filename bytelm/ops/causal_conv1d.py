"""Causal depthwise conv1d + optional SiLU (Mamba's short convolution): reference and backend switch.

Shapes follow mamba_ssm / causal-conv1d:
    x      : (batch, dim, length)   channel-first, any strides
    weight : (dim, width) or nn.Conv1d's (dim, 1, width)
    bias   : (dim,) or None
    out    : (batch, dim, length)   in x.dtype

    out[b, d, t] = act(bias[d] + sum_{k<width} weight[d, k] * x[b, d, t - (width - 1) + k])
with x[..., t < 0] = 0 (left padding: step t sees only steps <= t) and act = SiLU or identity.

`causal_conv1d_ref` is plain PyTorch (fp32 maths); `causal_conv1d_fn` picks a backend: "ref" or
"triton" (fused kernels in bytelm/ops/triton/causal_conv1d.py, CUDA or the Triton interpreter);
"auto" means triton on CUDA tensors and ref elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bytelm.ops.backend import resolve_backend as _resolve

BACKENDS = ("auto", "ref", "triton")
ACTIVATIONS = (None, "silu")


def check_conv_args(x, weight, bias, activation) -> int:
    """One-line ValueErrors for unusable arguments; returns the filter width."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r}; choose None or 'silu'")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, length), got shape {tuple(x.shape)}")
    dim = x.shape[1]
    if not (weight.dim() == 2 or (weight.dim() == 3 and weight.shape[1] == 1)) or weight.shape[0] != dim:
        raise ValueError(f"causal_conv1d: weight must be ({dim}, width) or ({dim}, 1, width), "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[-1] < 1:
        raise ValueError("causal_conv1d: weight has width 0")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"causal_conv1d: bias must be ({dim},), got shape {tuple(bias.shape)}")
    return weight.shape[-1]


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """Causal depthwise conv1d (+ SiLU) in plain PyTorch.

    x: (batch, dim, length); weight: (dim, width) or (dim, 1, width); bias: (dim,) or None;
    activation: None or "silu". Returns out (batch, dim, length) in x.dtype. Computes in fp32
    (fp64 for fp64 inputs, so that gradcheck can run), outside any autocast.
    """
    width = check_conv_args(x, weight, bias, activation)
    cdt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        w = weight.reshape(x.shape[1], 1, width).to(cdt)
        b = bias.to(cdt) if bias is not None else None
        # left padding makes it causal; one step on the right keeps an empty sequence legal
        length = x.shape[-1]
        out = F.conv1d(F.pad(x.to(cdt), (width - 1, int(length == 0))), w, b,
                       groups=x.shape[1])[..., :length]
        if activation == "silu":
            out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_fn(x, weight, bias=None, activation=None, backend="auto"):
    """The causal conv through the chosen backend; arguments and result as `causal_conv1d_ref`."""
    backend = _resolve("conv", backend, x.device, BACKENDS)
    if backend == "triton":
        from bytelm.ops.triton.causal_conv1d import causal_conv1d_triton as impl
    else:
        impl = causal_conv1d_ref
    return impl(x, weight, bias, activation)
