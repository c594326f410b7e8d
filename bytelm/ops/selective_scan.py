"""Mamba-1 selective scan: plain-PyTorch references and the backend switch.

Shapes follow mamba_ssm so that its kernels and ours are interchangeable:
    u, delta, z : (batch, dim, length)
    A           : (dim, state)          fp32, negative real
    B, C        : (batch, state, length)
    D, delta_bias : (dim,)              fp32
    initial_state / final state : (batch, dim, state)  fp32

The recurrence, per batch b, channel d, state n, time t:
    dt_t = softplus(delta_t + delta_bias)            (softplus only if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = sum_n C_t[n] * h_t[n] + D * u_t
    out  = y * silu(z)                                (only if z is given)

Three implementations live here:
    selective_scan_naive  -- one Python step per time step; obviously correct, used by tests.
    selective_scan_ref    -- the same maths as a two-level chunked scan (sqrt(L) sequential steps),
                             fast enough to train small models on a CPU; autograd gives gradients.
    selective_state_update_ref -- one time step for generation, carrying the state.
`selective_scan_fn` picks a backend: "ref", "naive" or "triton" (fused kernels, CUDA or the
Triton interpreter); "auto" means triton on CUDA tensors and ref elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bytelm.ops.backend import resolve_backend as _resolve

BACKENDS = ("auto", "ref", "naive", "triton")


def _compute_dtype(x):
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 ones (so gradcheck can run)."""
    return torch.promote_types(x.dtype, torch.float32)


def _delta(delta, delta_bias, delta_softplus, cdt):
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[None, :, None]
    return F.softplus(dt) if delta_softplus else dt


def _finish(y, u, D, z, out_dtype):
    """y: (b,d,l) scan output in the compute dtype -> D skip, SiLU(z) gate, cast."""
    if D is not None:
        y = y + D.to(y.dtype)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         initial_state=None, return_final_state=False):
    """Step-by-step reference (slow, obviously correct). Shapes as in the module docstring."""
    cdt = _compute_dtype(u)
    u32, dt, A, B, C = u.to(cdt), _delta(delta, delta_bias, delta_softplus, cdt), A.to(cdt), B.to(cdt), C.to(cdt)
    batch, dim, length = u.shape
    h = initial_state.to(cdt) if initial_state is not None else u32.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(dt[:, :, t, None] * A)
        h = dA * h + (dt[:, :, t] * u32[:, :, t]).unsqueeze(-1) * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(batch, dim, 0)
    out = _finish(y, u32, D, z, u.dtype)
    return (out, h) if return_final_state else out


def _chunked_linear_recurrence(a, x, h0, reverse=False):
    """States of h_t = a_t * h_{t-1} + x_t over the leading (time) dim.

    a, x: (length, *rest); h0: (*rest). Returns H of shape (length + 1, *rest) holding the
    boundary state too, so that shifted views cost nothing: forward, H[0] = h0 and H[t+1] is
    the state after step t; reverse (h_t = a_t * h_{t+1} + x_t, h_length = h0), H[length] = h0.

    Two levels so that only ~2*sqrt(length) sequential steps run in Python: each chunk of T
    steps scans from a zero state (all chunks at once), then a pass over chunks carries the
    state across boundaries, and each position adds (product of decays so far) * carry-in.
    Only products of decays in [0, 1] appear, so it is as stable as the step-by-step loop.
    Time-major, contiguous inputs keep every slice contiguous.
    """
    length, rest = a.shape[0], a.shape[1:]
    T = math.isqrt(max(length - 1, 0)) + 1
    nchunks = -(-length // T)
    pad = nchunks * T - length
    if pad:  # identity steps (a=1, x=0) leave the state unchanged
        ones, zeros = a.new_ones(pad, *rest), x.new_zeros(pad, *rest)
        a = torch.cat([ones, a] if reverse else [a, ones])
        x = torch.cat([zeros, x] if reverse else [x, zeros])
    a = a.reshape(nchunks, T, -1)
    x = x.reshape(nchunks, T, -1)
    H = x.new_empty(nchunks * T + 1, a.shape[-1])
    steps = range(T - 1, -1, -1) if reverse else range(T)
    chunks = range(nchunks - 1, -1, -1) if reverse else range(nchunks)

    local = torch.empty_like(x)  # state from a zero start of each chunk
    decay = torch.empty_like(a)  # cumulative product of a within the chunk
    first, last = steps[0], steps[-1]
    local[:, first], decay[:, first] = x[:, first], a[:, first]
    for prev, t in zip(steps[:-1], steps[1:]):
        torch.addcmul(x[:, t], a[:, t], local[:, prev], out=local[:, t])
        torch.mul(a[:, t], decay[:, prev], out=decay[:, t])
    carry = torch.empty_like(local[:, 0])  # state entering each chunk
    carry[chunks[0]] = h0.reshape(-1)
    for prev, c in zip(chunks[:-1], chunks[1:]):
        torch.addcmul(local[prev, last], decay[prev, last], carry[prev], out=carry[c])
    if reverse:
        torch.addcmul(local, decay, carry.unsqueeze(1), out=H[:-1].view_as(local))
        H[-1] = h0.reshape(-1)
        return H[pad:].view(length + 1, *rest)
    torch.addcmul(local, decay, carry.unsqueeze(1), out=H[1:].view_as(local))
    H[0] = h0.reshape(-1)
    return H[:length + 1].view(length + 1, *rest)


class _ScanCore(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, time-major.

    dt, u: (length, batch, dim) contiguous; A: (dim, n); B, C: (length, batch, n);
    h0: (batch, dim, n). Returns y (length, batch, dim) and the final state (batch, dim, n).
    The backward runs the same chunked recurrence in reverse, written out by hand so that
    autograd keeps no graph of the chunk steps.
    """

    @staticmethod
    def forward(ctx, dt, u, A, B, C, h0):
        with torch.autocast(dt.device.type, enabled=False):  # the reference stays in fp32
            return _ScanCore._forward(ctx, dt, u, A, B, C, h0)

    @staticmethod
    def _forward(ctx, dt, u, A, B, C, h0):
        dA = torch.exp(dt.unsqueeze(-1) * A)
        dBu = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
        H = _chunked_linear_recurrence(dA, dBu, h0)  # H[t+1] = h_t
        y = torch.einsum("lbdn,lbn->lbd", H[1:], C)
        ctx.save_for_backward(dt, u, A, B, C, dA, H)
        return y, H[-1].clone()

    @staticmethod
    def backward(ctx, dy, dh_last):
        with torch.autocast(dy.device.type, enabled=False):
            return _ScanCore._backward(ctx, dy, dh_last)

    @staticmethod
    def _backward(ctx, dy, dh_last):
        dt, u, A, B, C, dA, H = ctx.saved_tensors
        # time-major like everything saved: a strided dy (its layout follows the caller's
        # tensors) would make every (l, b, d, n) product below a strided one
        dy, dh_last = dy.to(dt.dtype).contiguous(), dh_last.to(dt.dtype)
        # dh_t = C_t dy_t + dA_{t+1} dh_{t+1}. With G_t = dA_t dh_t this is a reverse
        # recurrence in dA itself (no shifted copy): G_t = dA_t G_{t+1} + dA_t C_t dy_t.
        x = dy.unsqueeze(-1) * C.unsqueeze(2)
        G = _chunked_linear_recurrence(dA, dA * x, dh_last, reverse=True)  # G[L] = dh_last
        dh = x.add_(G[1:])
        q = dh * H[:-1] * dA  # gradient w.r.t. the exponent dt*A
        dhB = torch.einsum("lbdn,lbn->lbd", dh, B)
        d_dt = (q * A).sum(-1) + u * dhB
        d_A = (q * dt.unsqueeze(-1)).sum((0, 1))
        d_B = torch.einsum("lbdn,lbd->lbn", dh, dt * u)
        d_C = torch.einsum("lbdn,lbd->lbn", H[1:], dy)
        return d_dt, dt * dhB, d_A, d_B, d_C, G[0]


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_final_state=False):
    """Chunked reference selective scan.

    u, delta, z: (batch, dim, length); A: (dim, state); B, C: (batch, state, length);
    D, delta_bias: (dim,); initial_state: (batch, dim, state).
    Returns out (batch, dim, length) in u.dtype, plus the final state (batch, dim, state) fp32
    when return_final_state. Computes in fp32. Holds (length, batch, dim, state) tensors: it
    is the reference, not the fast path.
    """
    batch, dim, length = u.shape
    cdt = _compute_dtype(u)
    dt = _delta(delta, delta_bias, delta_softplus, cdt)
    h0 = (initial_state.to(cdt) if initial_state is not None
          else u.new_zeros(batch, dim, A.shape[1], dtype=cdt))
    u32 = u.to(cdt)
    if length == 0:
        y, h_last = u32.new_zeros(batch, dim, 0), h0
    else:
        def time_major(t):
            return t.to(cdt).permute(2, 0, 1).contiguous()

        y, h_last = _ScanCore.apply(time_major(dt), time_major(u32), A.to(cdt), time_major(B),
                                    time_major(C), h0)
        y = y.permute(1, 2, 0)
    out = _finish(y, u32, D, z, u.dtype)
    return (out, h_last) if return_final_state else out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False):
    """One time step of the selective scan, for generation.

    state: (batch, dim, state) fp32, updated in place; x, dt, z: (batch, dim);
    A: (dim, state); B, C: (batch, state); D, dt_bias: (dim,).
    Returns out (batch, dim) in x.dtype.
    """
    cdt = state.dtype
    dt = _delta(dt.unsqueeze(-1), dt_bias, dt_softplus, cdt).squeeze(-1)
    x32 = x.to(cdt)
    dA = torch.exp(dt.unsqueeze(-1) * A.to(cdt))
    state.copy_(state * dA + (dt * x32).unsqueeze(-1) * B.to(cdt).unsqueeze(1))
    y = torch.einsum("bdn,bn->bd", state, C.to(cdt))
    return _finish(y.unsqueeze(-1), x32.unsqueeze(-1), D, None if z is None else z.unsqueeze(-1),
                   x.dtype).squeeze(-1)


def resolve_backend(backend: str, device: torch.device) -> str:
    return _resolve("scan", backend, device, BACKENDS)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      initial_state=None, return_final_state=False, backend="auto"):
    """The selective scan through the chosen backend; arguments as `selective_scan_ref`."""
    backend = resolve_backend(backend, u.device)
    if backend == "triton":
        from bytelm.ops.triton.selective_scan import selective_scan_triton as impl
    elif backend == "naive":
        impl = selective_scan_naive
    else:
        impl = selective_scan_ref
    return impl(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                delta_softplus=delta_softplus, initial_state=initial_state,
                return_final_state=return_final_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           backend="auto"):
    """One generation step through the chosen backend; arguments as `selective_state_update_ref`."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        from bytelm.ops.triton.selective_scan import selective_state_update_triton as impl
    else:
        impl = selective_state_update_ref
    return impl(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
