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

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                 out_dtype: torch.dtype | None = None):
        """residual + x in fp32 (fp64 for fp64 inputs; x alone when residual is None), then the
        norm of that sum, in one pass (bytelm.ops.rms_norm.add_rms_norm_fn). x, residual:
        (..., dim). Returns (y in out_dtype, residual_out, the fp32 / fp64 stream). out_dtype None: the autocast dtype when autocast
        is on, since every consumer (a projection) would cast y to it: written so by the norm,
        no cast runs either way (nor on y's gradient); else the weight's dtype, what forward()
        returns for the fp32 stream."""
        if out_dtype is None:
            dev = x.device.type
            out_dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                         else self.weight.dtype)
        return add_rms_norm_fn(x, residual, self.weight, self.eps, out_dtype, self.backend)
