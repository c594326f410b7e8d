"""SwiGLU MLP (Shazeer 2020, as in LLaMA): out_proj(silu(gate) * up), gate and up from one matmul."""

from __future__ import annotations

import torch
from torch import nn

from bytelm.ops.swiglu import swiglu_fn


def swiglu_hidden(d_model: int, multiple: int = 32) -> int:
    """8/3 d_model (the hidden size that gives SwiGLU the parameters of a 4x GELU MLP),
    rounded up to a multiple of 32."""
    return -(-8 * d_model // (3 * multiple)) * multiple


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend  # the gate's (bytelm.ops.swiglu)
        self.in_proj = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.out_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., d_model) -> (..., d_model)."""
        return self.out_proj(swiglu_fn(self.in_proj(hidden), self.backend))
