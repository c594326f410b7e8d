"""The Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU over (x, B, C) -> SSD scan -> RMSNorm
of the scan's output gated by SiLU(z) -> out_proj (mamba_ssm's Mamba2: RMSNormGated, gate
before the norm)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bytelm.ops.causal_conv1d import causal_conv1d_fn
from bytelm.ops.channel_major import linear_rows_and_cm
from bytelm.ops.rms_norm import MAX_GATED_DIM, gated_rms_norm_fn
from bytelm.ops.ssd import (resolve_backend, split_xbc, split_xbcdt, ssd_state_update_ref,
                            ssd_xbc_fn)


@dataclass
class Mamba2State:
    """Recurrent inference state of one mixer: O(1) in the generated length."""

    conv: torch.Tensor  # (batch, conv_dim, d_conv): the last d_conv inputs of the conv
    ssm: torch.Tensor  # (batch, heads, head_dim, d_state) fp32


class Mamba2Mixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                 head_dim: int = 64, n_groups: int = 1, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, A_init_range: tuple[float, float] = (1.0, 16.0),
                 norm_eps: float = 1e-5, scan_backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(f"Mamba-2: head_dim {head_dim} does not divide the inner width "
                             f"{self.d_inner} (expand x d_model)")
        self.head_dim, self.n_heads, self.n_groups = head_dim, self.d_inner // head_dim, n_groups
        if self.n_heads % n_groups:
            raise ValueError(f"Mamba-2: n_groups {n_groups} does not divide {self.n_heads} heads")
        self.conv_dim = self.d_inner + 2 * n_groups * d_state
        self.norm_eps, self.scan_backend = norm_eps, scan_backend
        if scan_backend == "triton":  # a head x state tile that cannot fit fails here, not at step 1
            from bytelm.ops.triton.ssd import tile_sizes
            tile_sizes(head_dim, d_state)  # bf16 operands, the loosest bound

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=True)
        # mamba_ssm's initialisation: dt log-uniform in [dt_min, dt_max] through its bias,
        # A uniform in A_init_range (one rate a head), D = 1
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @property
    def _norm_backend(self) -> str:
        return "ref" if self.scan_backend == "naive" else self.scan_backend

    def _split(self, zxbcdt: torch.Tensor):
        """(..., in_proj width) -> z (..., d_inner), xBC (..., conv_dim), dt (..., heads)."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _scan_params(self):
        """A (negative decay rates), D and dt_bias as the scans take them: fp32."""
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_bias.float()

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., d_inner) -> RMSNorm of y * silu(z) -> out_proj. As mamba_ssm's
        RMSNormGated, the norm runs over each group's channels (all of d_inner for one group)."""
        return self.out_proj(gated_rms_norm_fn(y, z, self.norm_weight, self.norm_eps, self.n_groups,
                                               self._norm_backend))

    def forward(self, hidden: torch.Tensor, return_state: bool = False):
        """hidden: (batch, length, d_model) -> (batch, length, d_model) [, Mamba2State].

        The in_proj writes z as rows (positions, d_inner), what the gated norm reads, and x, B,
        C and dt channel-major (channels, batch x length), as in the Mamba-1 mixer: the conv
        reads its (x, B, C) rows with time steps adjacent and writes the same layout, the scan
        reads x, B, C and dt there through strided views. On the Triton backend conv, scan and
        gated norm are one autograd node that writes the gradients of x, B, C and dt into one
        buffer in those rows; elsewhere autograd joins them by one coalesced cat."""
        batch, length, _ = hidden.shape
        z, xbcdt = linear_rows_and_cm(hidden.reshape(-1, self.d_model), self.in_proj.weight,
                                      self.in_proj.bias, self.d_inner)
        if (not return_state and z.shape[0] > 0 and z.dtype != torch.float64
                and self.d_inner <= MAX_GATED_DIM
                and resolve_backend(self.scan_backend, z.device) == "triton"):
            # conv, scan and gated norm as one autograd node (ops/triton/mamba2_inner.py)
            from bytelm.ops.triton.mamba2_inner import mamba2_inner_triton
            normed = mamba2_inner_triton(z, xbcdt, self.conv1d.weight, self.conv1d.bias,
                                         *self._scan_params(), self.norm_weight, self.norm_eps,
                                         batch, self.head_dim, self.n_groups, self.d_state)
            return self.out_proj(normed)
        xbc_in, dt = split_xbcdt(xbcdt, batch, length, self.n_heads)
        xbc = causal_conv1d_fn(xbc_in.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                               activation="silu", backend=self._norm_backend).transpose(1, 2)
        A, D, dt_bias = self._scan_params()
        y = ssd_xbc_fn(xbc, dt, A, D=D, dt_bias=dt_bias, dt_softplus=True, head_dim=self.head_dim,
                       n_groups=self.n_groups, d_state=self.d_state,
                       return_final_state=return_state, backend=self.scan_backend)
        if return_state:
            y, ssm_state = y
        out = self._out(y.flatten(-2), z.view(batch, length, self.d_inner))
        if not return_state:
            return out
        conv_state = F.pad(xbc_in.transpose(1, 2), (self.d_conv - length, 0))[..., -self.d_conv:]
        return out, Mamba2State(conv_state.contiguous(), ssm_state)

    def init_state(self, batch: int, device=None, dtype=None) -> Mamba2State:
        device = device or self.A_log.device
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2State(
            torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
            torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device,
                        dtype=torch.float32))

    def step(self, hidden: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One time step. hidden: (batch, d_model); `state` is updated in place."""
        z, xbc, dt = self._split(self.in_proj(hidden))
        state.conv.copy_(torch.roll(state.conv, shifts=-1, dims=-1))
        state.conv[..., -1] = xbc.to(state.conv.dtype)
        xbc = (state.conv * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias
        x, B, C = split_xbc(F.silu(xbc).to(hidden.dtype), self.head_dim, self.n_groups, self.d_state)
        A, D, dt_bias = self._scan_params()
        y = ssd_state_update_ref(state.ssm, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)
        return self._out(y.flatten(-2), z)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token beyond the linear layers (counted by the model from params):
        the depthwise conv, and the recurrence's work a head (decay and input into the
        head_dim x d_state state: 3 a cell; C into y: 2 a cell; D skip and gate), not the
        chunked form's larger count."""
        cells = self.n_heads * self.head_dim * self.d_state
        return 2 * self.conv_dim * self.d_conv + 5 * cells + 6 * self.d_inner
