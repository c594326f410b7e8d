import torch
from torch import nn

from bytelm.ops.rms_norm import add_rms_norm_fn, rms_norm_fn


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

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        """residual + x in fp32 (x.float() when residual is None), then the norm of that sum,
        in one pass (bytelm.ops.rms_norm.add_rms_norm_fn). x, residual: (..., dim). Returns
        (y, residual_out fp32). y is in the weight's dtype: what forward() returned for the
        residual stream, whose dtype the mixers' decoding steps follow."""
        return add_rms_norm_fn(x, residual, self.weight, self.eps, self.weight.dtype, self.backend)
