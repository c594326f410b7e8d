"""The Mamba-1 mixer: in_proj -> causal depthwise conv + SiLU -> selective scan -> out_proj."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bytelm.ops.causal_conv1d import causal_conv1d_fn
from bytelm.ops.channel_major import linear_from_cm, linear_to_cm
from bytelm.ops.selective_scan import resolve_backend, selective_scan_fn, selective_state_update


@dataclass
class MambaState:
    """Recurrent inference state of one mixer: O(1) in the generated length."""

    conv: torch.Tensor  # (batch, d_inner, d_conv): the last d_conv inputs of the conv
    ssm: torch.Tensor  # (batch, d_inner, d_state) fp32


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 scan_backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        # Standard Mamba initialisation: dt_proj keeps the initial dt in [dt_min, dt_max]
        # (log-uniform) through its bias = softplus^-1(dt); A = -[1..N]; D = 1.
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def _ssm_params(self, x: torch.Tensor):
        """x: (..., d_inner) -> dt (..., d_inner) without bias, B and C (..., d_state)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, hidden: torch.Tensor, return_state: bool = False):
        """hidden: (batch, length, d_model) -> (batch, length, d_model) [, MambaState].

        Channel-major, as mamba_ssm: each projection is one matmul over all batch x length
        positions, written (channels, batch * length). The conv and scan kernels read the
        (batch, channels, length) views of that storage in place (time steps adjacent) and write
        the same layout, which the next matmul reads in place, and the gradients come back in
        the same layouts (bytelm.ops.channel_major): no transpose is copied (they took a third of
        the step when they were: benchmarks/results/profile-h200.md)."""
        batch, length, _ = hidden.shape
        xz = linear_to_cm(hidden.reshape(-1, self.d_model), self.in_proj.weight, self.in_proj.bias)
        if not return_state and length > 0 and resolve_backend(self.scan_backend, xz.device) == "triton":
            # conv, x_proj, dt_proj and scan as one autograd node: its backward writes the
            # gradients into shared buffers, no cat or add of autograd's (ops/triton/mamba_inner.py)
            from bytelm.ops.triton.mamba_inner import mamba_inner_triton
            y = mamba_inner_triton(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                   self.dt_proj.weight, -torch.exp(self.A_log.float()),
                                   self.D.float(), self.dt_proj.bias.float(), batch, self.dt_rank)
            return linear_from_cm(y.transpose(0, 1).reshape(self.d_inner, -1), self.out_proj.weight,
                                  self.out_proj.bias).view(batch, length, self.d_model)
        # split in channel-major space: the two gradients then join by one coalesced cat
        x_cm, z_cm = xz.chunk(2, dim=0)

        def per_row(t):  # (channels, b l) -> (b, channels, l) view
            return t.view(-1, batch, length).transpose(0, 1)

        conv_in, z = per_row(x_cm), per_row(z_cm)                                # (b, d_inner, l)
        x = causal_conv1d_fn(conv_in, self.conv1d.weight, self.conv1d.bias, activation="silu",
                             backend=self._conv_backend)
        x_dbl = self.x_proj.weight @ x.transpose(0, 1).reshape(self.d_inner, -1)  # (r + 2n, b l)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state])
        dt = self.dt_proj.weight @ dt                                              # (d_inner, b l)

        y = selective_scan_fn(
            x, per_row(dt), -torch.exp(self.A_log.float()), per_row(B), per_row(C),
            D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_final_state=return_state, backend=self.scan_backend)
        if return_state:
            y, ssm_state = y
        out = linear_from_cm(y.transpose(0, 1).reshape(self.d_inner, -1), self.out_proj.weight,
                             self.out_proj.bias).view(batch, length, self.d_model)
        if not return_state:
            return out
        conv_state = F.pad(conv_in, (self.d_conv - length, 0))[..., -self.d_conv:]
        return out, MambaState(conv_state.contiguous(), ssm_state)

    @property
    def _conv_backend(self) -> str:
        return "ref" if self.scan_backend == "naive" else self.scan_backend

    def init_state(self, batch: int, device=None, dtype=None) -> MambaState:
        device = device or self.A_log.device
        dtype = dtype or self.in_proj.weight.dtype
        return MambaState(torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device,
                                      dtype=torch.float32))

    def step(self, hidden: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One time step. hidden: (batch, d_model); `state` is updated in place."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        state.conv.copy_(torch.roll(state.conv, shifts=-1, dims=-1))
        state.conv[..., -1] = x.to(state.conv.dtype)
        x = (state.conv * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x).to(hidden.dtype)
        dt, B, C = self._ssm_params(x)
        y = selective_state_update(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C,
                                   D=self.D.float(), z=z, dt_bias=self.dt_proj.bias.float(),
                                   dt_softplus=True, backend=self.scan_backend)
        return self.out_proj(y)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token beyond the linear layers (counted by the model from params):
        the depthwise conv and the scan's element-wise work (exp, discretise, update, C dot,
        D skip, gate)."""
        return 2 * self.d_inner * self.d_conv + self.d_inner * (9 * self.d_state + 8)
