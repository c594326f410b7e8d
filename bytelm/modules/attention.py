"""Causal multi-head self-attention with rotary position embeddings and a KV cache.

The training path is one `F.scaled_dot_product_attention(is_causal=True)` call (flash attention
on the GPU) after RoPE (bytelm.ops.rotary: one fused kernel a direction on the GPU); generation
appends each new key/value to a KVCache and attends over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bytelm.ops.rotary import qkv_rotary_fn

# Decoding changes the key length every step. cuDNN's attention plans per shape, so it is left
# out of the one-query path (the flash and memory-efficient kernels take any length).
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class KVCache:
    """Keys and values (rotated) of the positions seen so far; grows by doubling, in place."""

    k: torch.Tensor  # (batch, n_head, capacity, head_dim)
    v: torch.Tensor  # (batch, n_head, capacity, head_dim)
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_head, new, head_dim); returns every cached key and value."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            capacity = max(2 * self.k.shape[2], end, 16)
            grow = (0, 0, 0, capacity - self.k.shape[2])
            self.k, self.v = F.pad(self.k, grow), F.pad(self.v, grow)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, rope_theta: float = 10000.0,
                 backend: str = "auto"):
        super().__init__()
        if d_model % n_head or (d_model // n_head) % 2:
            raise ValueError(f"attention needs d_model ({d_model}) divisible by n_head ({n_head}) "
                             f"into an even head_dim (RoPE rotates pairs)")
        self.d_model, self.n_head, self.head_dim = d_model, n_head, d_model // n_head
        self.rope_theta, self.backend = rope_theta, backend  # backend: RoPE's (bytelm.ops.rotary)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, hidden: torch.Tensor, start: int):
        """hidden (batch, length, d_model) -> rotated q, k and v, each (batch, n_head, length, head_dim)."""
        return qkv_rotary_fn(self.qkv_proj(hidden), self.n_head, start, self.rope_theta,
                             self.backend)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(b, length, self.d_model))

    def forward(self, hidden: torch.Tensor, return_state: bool = False):
        """hidden: (batch, length, d_model) -> (batch, length, d_model) [, KVCache of the length]."""
        q, k, v = self._qkv(hidden, 0)
        out = self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        if not return_state:
            return out
        return out, KVCache(k.contiguous(), v.contiguous(), k.shape[2])

    def init_state(self, batch: int, device=None, dtype=None) -> KVCache:
        device = device or self.qkv_proj.weight.device
        dtype = dtype or self.qkv_proj.weight.dtype
        empty = torch.zeros(batch, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone(), 0)

    def step(self, hidden: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One position. hidden: (batch, d_model); `cache` grows by one in place."""
        q, k, v = self._qkv(hidden[:, None], cache.length)
        k, v = cache.append(k, v)
        # The cache holds only the past and the present: nothing to mask.
        with sdpa_kernel(DECODE_BACKENDS):
            return self._out(F.scaled_dot_product_attention(q, k, v))[:, 0]

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token beyond the projections (counted by the model from params):
        scores q.k and the weighted sum of values, 2 * d_model each per attended key. Causal:
        query t of a window attends to t+1 keys, so over a window of seq_len the mean is
        (seq_len+1)/2 keys, which is 2 * d_model * (seq_len + 1) per token (masked pairs free)."""
        return 2 * self.d_model * (seq_len + 1)
