import torch
from torch import nn

from bytelm.ops.rms_norm import rms_norm_fn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype; returns x.dtype.

    x: (..., dim). Fused Triton kernels on CUDA, the plain-PyTorch reference elsewhere
    (bytelm.ops.rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_fn(x, self.weight, self.eps, self.backend)
