"""Mamba-2's state-space duality (SSD) scan: plain-PyTorch references and the backend switch.

Shapes follow mamba_ssm's `mamba_chunk_scan_combined`:
    x, z          : (batch, length, heads, head_dim)
    dt            : (batch, length, heads)
    A             : (heads,)                       fp32, negative: one decay rate a head
    B, C          : (batch, length, groups, state)  heads // groups heads share a group's B, C
    D, dt_bias    : (heads,)                       fp32
    initial_state / final state : (batch, heads, head_dim, state)  fp32

The recurrence, per batch b, head h (in group g), time t:
    dt_t = softplus(dt_t + dt_bias)                 (softplus only if dt_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T     (head_dim x state)
    y_t  = h_t C_t + D * x_t
    out  = y * silu(z)                               (only if z is given)

Unlike Mamba-1 the decay is one scalar a head and step, so within a chunk of T steps the scan is
a masked matrix product (C B^T weighted by decay ratios) that runs on tensor cores, and only the
(head_dim x state) states cross chunk boundaries.

    ssd_naive        -- one Python step per time step; obviously correct, used by tests.
    ssd_ref          -- the chunked form in einsums (autograd gives the gradients); fast enough
                        to train small models on a CPU.
    ssd_state_update_ref -- one time step for generation, carrying the state.
`ssd_fn` (and `ssd_xbc_fn`, x, B and C as one tensor: the Mamba-2 conv's output) picks a backend: "ref", "naive" or "triton" (bytelm/ops/triton/ssd.py; CUDA or the
Triton interpreter); "auto" means triton on CUDA tensors and ref elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bytelm.ops.backend import resolve_backend as _resolve

BACKENDS = ("auto", "ref", "naive", "triton")


def check_ssd_args(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None):
    """One-line ValueErrors for inputs that do not fit together (shapes, devices, dtypes);
    returns (groups, state)."""
    named = (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
             ("dt_bias", dt_bias), ("initial_state", initial_state))
    for name, t in named:
        if t is not None and not t.is_floating_point():
            raise ValueError(f"ssd: {name} must be a floating-point tensor, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"ssd: {name} is on {t.device}, x on {x.device}")
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, length, heads, head_dim), got {tuple(x.shape)}")
    batch, length, heads, head_dim = x.shape
    if tuple(dt.shape) != (batch, length, heads):
        raise ValueError(f"ssd: dt must be {(batch, length, heads)}, got {tuple(dt.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"ssd: B and C must be (batch, length, groups, state) alike, got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    groups, state = B.shape[2], B.shape[3]
    if groups < 1 or heads % groups:
        raise ValueError(f"ssd: {groups} groups do not divide {heads} heads")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (heads,):
            raise ValueError(f"ssd: {name} must be ({heads},), got {tuple(t.shape)}")
    if z is not None and tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"ssd: z must be shaped like x {tuple(x.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, heads, head_dim, state):
        raise ValueError(f"ssd: initial_state must be {(batch, heads, head_dim, state)}, got "
                         f"{tuple(initial_state.shape)}")
    return groups, state


def _compute_dtype(x):
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 ones (so gradcheck can run)."""
    return torch.promote_types(x.dtype, torch.float32)


def _dt(dt, dt_bias, dt_softplus, cdt):
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    return F.softplus(dt) if dt_softplus else dt


def _heads(t, heads):
    """(batch, length, groups, state) -> (batch, length, heads, state): each head its group's."""
    return t.repeat_interleave(heads // t.shape[2], dim=2) if t.shape[2] != heads else t


def _finish(y, x, D, z, out_dtype):
    """y: (b, l, h, p) in the compute dtype -> D skip, SiLU(z) gate, cast."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def ssd_naive(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
              initial_state=None, return_final_state=False):
    """Step-by-step reference (slow, obviously correct). Shapes as in the module docstring."""
    check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state)
    cdt = _compute_dtype(x)
    batch, length, heads, head_dim = x.shape
    x32, dt = x.to(cdt), _dt(dt, dt_bias, dt_softplus, cdt)
    B, C = _heads(B.to(cdt), heads), _heads(C.to(cdt), heads)
    h = (initial_state.to(cdt) if initial_state is not None
         else x32.new_zeros(batch, heads, head_dim, B.shape[-1]))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A.to(cdt))                              # (b, h)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x32[:, t])[..., None] * B[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x32.new_zeros(batch, 0, heads, head_dim)
    out = _finish(y, x32, D, z, x.dtype)
    return (out, h) if return_final_state else out


def ssd_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
            initial_state=None, return_final_state=False, chunk_size=64):
    """Chunked reference: within each chunk of `chunk_size` steps the outputs are a masked
    product (C_t . B_s) exp(cs_t - cs_s) dt_s x_s over s <= t, where cs is the running sum of
    dt * A; the states entering the chunks are carried by a short loop over chunks. Computes in
    fp32 (fp64 for fp64 inputs). Shapes as in the module docstring; returns out (b, l, h, p) in
    x.dtype, plus the final state when return_final_state."""
    check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state)
    cdt = _compute_dtype(x)
    batch, length, heads, head_dim = x.shape
    x32, dt = x.to(cdt), _dt(dt, dt_bias, dt_softplus, cdt)
    B, C = _heads(B.to(cdt), heads), _heads(C.to(cdt), heads)
    state = B.shape[-1]
    h = (initial_state.to(cdt) if initial_state is not None
         else x32.new_zeros(batch, heads, head_dim, state))
    T = chunk_size
    n = -(-length // T)
    pad = n * T - length

    def chunks(t):  # (b, l, ...) -> (b, n, T, ...), padded with zeros (dt = 0: no decay, no input)
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).view(batch, n, T, *t.shape[2:])

    xdt = chunks(x32 * dt[..., None])                                    # (b, n, T, h, p)
    Bc, Cc = chunks(B), chunks(C)                                        # (b, n, T, h, s)
    cs = chunks(dt * A.to(cdt)).cumsum(2)                                # (b, n, T, h)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    diff = cs[:, :, :, None, :] - cs[:, :, None, :, :]                   # (b, n, t, s, h)
    decay = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bnthk,bnshk->bntsh", Cc, Bc) * decay
    y = torch.einsum("bntsh,bnshp->bnthp", scores, xdt)
    # each chunk's own contribution to the state leaving it, then the carry across chunks
    to_end = torch.exp(cs[:, :, -1:, :] - cs)                            # (b, n, T, h)
    chunk_states = torch.einsum("bnthk,bnth,bnthp->bnhpk", Bc, to_end, xdt)
    chunk_decay = torch.exp(cs[:, :, -1])                                # (b, n, h)
    entering = []
    for c in range(n):
        entering.append(h)
        h = chunk_decay[:, c, :, None, None] * h + chunk_states[:, c]
    if n:
        H = torch.stack(entering, dim=1)                                 # (b, n, h, p, s)
        y = y + torch.einsum("bnthk,bnhpk,bnth->bnthp", Cc, H, torch.exp(cs))
    y = y.reshape(batch, n * T, heads, head_dim)[:, :length]
    out = _finish(y, x32, D, z, x.dtype)
    return (out, h) if return_final_state else out


def ssd_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One time step of the SSD scan, for generation.

    state: (batch, heads, head_dim, state) fp32, updated in place; x, z: (batch, heads, head_dim);
    dt: (batch, heads); A, D, dt_bias: (heads,); B, C: (batch, groups, state).
    Returns out (batch, heads, head_dim) in x.dtype."""
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"ssd_state_update: the state must be fp32 (or fp64), got {state.dtype}")
    batch, heads, head_dim, _ = state.shape
    if tuple(x.shape) != (batch, heads, head_dim) or tuple(dt.shape) != (batch, heads):
        raise ValueError(f"ssd_state_update: x {tuple(x.shape)} and dt {tuple(dt.shape)} do not "
                         f"fit the state {tuple(state.shape)}")
    if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != state.shape[3] or C.shape != B.shape:
        raise ValueError(f"ssd_state_update: B and C must be (batch, groups, state), got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    cdt = state.dtype
    dt = _dt(dt, dt_bias, dt_softplus, cdt)
    x32 = x.to(cdt)
    B, C = _heads(B[:, None].to(cdt), heads)[:, 0], _heads(C[:, None].to(cdt), heads)[:, 0]
    decay = torch.exp(dt * A.to(cdt))
    state.copy_(decay[..., None, None] * state + (dt[..., None] * x32)[..., None] * B[:, :, None])
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return _finish(y[:, None], x32[:, None], D, None if z is None else z[:, None], x.dtype)[:, 0]


def split_xbc(xbc, head_dim, n_groups, d_state):
    """Mamba-2's conv output (batch, length, heads x head_dim + 2 x groups x state) -> views x
    (batch, length, heads, head_dim), B and C (batch, length, groups, state)."""
    inner = xbc.shape[-1] - 2 * n_groups * d_state
    if inner <= 0 or inner % head_dim:
        raise ValueError(f"ssd: xbc width {xbc.shape[-1]} is not heads x {head_dim} + 2 x "
                         f"{n_groups} x {d_state}")
    x, B, C = xbc.split([inner, n_groups * d_state, n_groups * d_state], dim=-1)
    return (x.unflatten(-1, (inner // head_dim, head_dim)), B.unflatten(-1, (n_groups, d_state)),
            C.unflatten(-1, (n_groups, d_state)))


def split_xbcdt(xbcdt, batch, length, heads):
    """The Mamba-2 in_proj's channel-major rows of x, B, C, then dt (conv_dim + heads, batch *
    length) -> views xBC (batch, length, conv_dim) and dt (batch, length, heads); never copies
    (sizes given, so an empty batch or length splits too)."""
    conv_dim = xbcdt.shape[0] - heads
    return tuple(t.view(t.shape[0], batch, length).permute(1, 2, 0)
                 for t in xbcdt.split([conv_dim, heads]))


def ssd_xbc_ref(xbc, dt, A, D=None, z=None, dt_bias=None, dt_softplus=False, head_dim=64,
                n_groups=1, d_state=64, initial_state=None, return_final_state=False):
    """The scan with x, B and C given as one tensor xbc (batch, length, conv_dim), split by
    `split_xbc`; otherwise as `ssd_ref`."""
    x, B, C = split_xbc(xbc, head_dim, n_groups, d_state)
    return ssd_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state)


def resolve_backend(backend: str, device: torch.device) -> str:
    return _resolve("ssd", backend, device, BACKENDS)


def ssd_xbc_fn(xbc, dt, A, D=None, z=None, dt_bias=None, dt_softplus=False, head_dim=64,
               n_groups=1, d_state=64, initial_state=None, return_final_state=False, backend="auto"):
    """`ssd_xbc_ref` through the chosen backend ("naive" splits xbc and runs ssd_naive)."""
    backend = resolve_backend(backend, xbc.device)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
              return_final_state=return_final_state)
    if backend == "triton":
        from bytelm.ops.triton.ssd import ssd_xbc_triton
        return ssd_xbc_triton(xbc, dt, A, head_dim=head_dim, n_groups=n_groups, d_state=d_state, **kw)
    if backend == "ref":
        return ssd_xbc_ref(xbc, dt, A, head_dim=head_dim, n_groups=n_groups, d_state=d_state, **kw)
    x, B, C = split_xbc(xbc, head_dim, n_groups, d_state)
    return ssd_naive(x, dt, A, B, C, **kw)


def ssd_fn(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
           return_final_state=False, backend="auto"):
    """The SSD scan through the chosen backend; arguments as `ssd_ref`."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        from bytelm.ops.triton.ssd import ssd_triton as impl
    elif backend == "naive":
        impl = ssd_naive
    else:
        impl = ssd_ref
    return impl(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                initial_state=initial_state, return_final_state=return_final_state)
