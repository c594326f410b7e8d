"""Rotary position embeddings (RoPE) on attention's fused q, k, v projection: the plain-PyTorch
reference and the backend switch.

    qkv     : (batch, length, 3 * n_head * head_dim)   [q | k | v], any float dtype
    q, k, v : (batch, n_head, length, head_dim)        qkv's dtype; q and k rotated

'Rotate half' RoPE (GPT-NeoX / LLaMA) at positions start, start + 1, ...: for i < half =
head_dim / 2, angle = pos * theta ** (-2i / head_dim) (`rope_tables`),

    out[i]        = x[i] cos(angle) - x[i + half] sin(angle)
    out[i + half] = x[i] sin(angle) + x[i + half] cos(angle)

in fp32, cast back to the input's dtype; v passes unchanged. `qkv_rotary_fn` picks a backend:
"ref" (this file; autograd gives the gradient) or "triton" (one kernel a direction,
bytelm/ops/triton/rotary.py: it reads qkv once and writes q, k and v, and its backward writes
d(qkv) in one buffer, where the reference runs ~10 element-wise kernels a tensor each way, in
fp32); "auto" means triton on CUDA tensors and ref elsewhere.
"""

from __future__ import annotations

import torch

from bytelm.ops.backend import resolve_backend as _resolve

BACKENDS = ("auto", "ref", "triton")


def rope_tables(length: int, start: int, head_dim: int, theta: float, device=None):
    """cos and sin of the angles pos * inv_freq_i, each (length, head_dim / 2) fp32, for the
    positions start .. start + length - 1."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def rotary_ref(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotate x (batch, n_head, length, head_dim) by its positions start, start+1, ...; computed
    in fp32, returned in x.dtype. The operations the attention module has always run."""
    cos, sin = rope_tables(x.shape[-2], start, x.shape[-1], theta, x.device)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def check_qkv(qkv: torch.Tensor, n_head: int) -> int:
    """One-line ValueError for a qkv the op cannot split; returns head_dim."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv_rotary: qkv must be (batch, length, 3 * d_model), got shape "
                         f"{tuple(qkv.shape)}")
    width = qkv.shape[-1]
    if n_head <= 0 or width % (3 * n_head) or (width // (3 * n_head)) % 2:
        raise ValueError(f"qkv_rotary: width {width} is not 3 x {n_head} heads of an even head_dim")
    return width // (3 * n_head)


def qkv_rotary_ref(qkv: torch.Tensor, n_head: int, start: int = 0, theta: float = 10000.0):
    """qkv (batch, length, 3 * n_head * head_dim) -> q, k (rotated) and v, each (batch, n_head,
    length, head_dim) views or tensors in qkv's dtype; see the module docstring."""
    head_dim = check_qkv(qkv, n_head)
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, n_head, head_dim).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return rotary_ref(q, start, theta), rotary_ref(k, start, theta), v


def qkv_rotary_fn(qkv: torch.Tensor, n_head: int, start: int = 0, theta: float = 10000.0,
                  backend: str = "auto"):
    """`qkv_rotary_ref` through the chosen backend; same arguments and results (the triton
    backend's q, k, v are (batch, n_head, length, head_dim) views of (batch, length, n_head,
    head_dim) tensors, the layout attention kernels read without copies)."""
    if _resolve("rotary", backend, qkv.device, BACKENDS) == "triton":
        from bytelm.ops.triton.rotary import qkv_rotary_triton
        return qkv_rotary_triton(qkv, n_head, start, theta)
    return qkv_rotary_ref(qkv, n_head, start, theta)
