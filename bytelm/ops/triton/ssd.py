"""Mamba-2's SSD scan as Triton kernels: chunks in parallel, states passed between them.

Shapes and maths as bytelm/ops/ssd.py (the references). The length is cut into chunks of T steps;
within a chunk (cs = running sum of dt * A, so exp(cs_t - cs_s) <= 1 for s <= t):

    G   = C B^T                                    (T x T, tensor cores; one a group, not a head)
    y   = (G * exp(cs_t - cs_s) [s <= t]) (dt x)   (T x head_dim)
        + exp(cs_t) C H  + D x,   then * silu(z) if z is given (the Mamba-2 mixer gates in
                                                        its norm and passes none)
    H'  = exp(cs_T) H + S,   S = (B * exp(cs_T - cs_s))^T (dt x)     (state x head_dim)

where H is the state entering the chunk. Every product is a tl.dot of T x T, T x state or
state x head_dim tiles: the state-expansion work that Mamba-1 does element by element on CUDA
cores runs on tensor cores here. Dot operands are in the inputs' dtype (bf16 under autocast),
accumulation in fp32; fp32 inputs use "tf32x3" products (three tf32 products a dot: fp32's
accuracy on the tensor cores; "ieee" dots compile to FMA loops that spill, 11.6x slower on the
H200 for the same accuracy, benchmarks/NOTES.md, twenty-first session).

Forward, three launches:
    _ssd_chunk_state_kernel  (batch x heads / HB, chunks): each chunk's own S and exp(cs_T)
    _ssd_state_pass_kernel   (batch x heads, state slices): H of every chunk by the recurrence
                             above, into a buffer in x's dtype; the final state
    _ssd_chunk_out_kernel    (batch x heads / HB, chunks): y
Backward, three more (dy = dout * silu(z), or dout without z; dH = gradient of the state leaving a chunk):
    _ssd_chunk_dstate_kernel (batch x heads / HB, chunks): each chunk's (C * exp(cs))^T dy
    _ssd_state_pass_kernel   reversed: dH of every chunk, dH <- exp(cs_T) dH + (C exp(cs))^T dy;
                             what is left at the start is the initial state's gradient
    _ssd_chunk_bwd_kernel    (batch x heads / HB, chunks), per chunk:
        dxdt = (G * L)^T dy + (B * w) dH                      w_s = exp(cs_T - cs_s)
        dC   = ((dy (dt x)^T) * L) B + exp(cs) * (dy H^T)
        dB   = ((dy (dt x)^T) * L)^T C + w * ((dt x) dH^T)
        dcs  = rows(M) - cols(M) + sum_p(dy * exp(cs) C H) - r,   M = G * L * (dy (dt x)^T),
               r_s = w_s (dt x)_s . ((B dH)_s); the last step also gets sum(r) + exp(cs_T) <H, dH>
        d(dt * A)_t = sum_{t' >= t} dcs_t'  (the running sum's adjoint)
A program of the chunk kernels walks HB heads of one group: G is made once for them, and dB, dC
sum over them in registers, then over a group's programs by fp32 atomics. dA, dD and dt_bias's
gradients are per-(batch, chunk, head) partial sums, added up by torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bytelm.ops.backend import needs_autograd
from bytelm.ops.ssd import check_ssd_args, split_xbc, ssd_ref

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# outputs' allocation (tests swap in NaN-filled buffers)
_empty, _empty_strided = torch.empty, torch.empty_strided


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b accumulated in fp32. DOT_F32 (the interpreter with bf16 / fp16 operands, whose dot
    multiplies their raw bits): the same rounded operands multiplied as fp32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _softplus(v):
    e = tl.exp(v)
    # log(1 + e) loses e's digits for small e: two terms of its series there
    return tl.where(v > 20.0, v, tl.where(v < -5.0, e * (1.0 - 0.5 * e), tl.log(1.0 + e)))


@triton.jit
def _head_steps(dt_ptr, sdt_l, t, mask_t, A_ptr, bias_ptr, h,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, T: tl.constexpr):
    """One head's chunk: A, dt raw (+ bias) and after softplus (0 past the end), and the running
    sum of dt * A in log2 units (exp2 of differences of it are the decays)."""
    A = tl.load(A_ptr + h).to(tl.float32)
    dt_raw = tl.load(dt_ptr + t * sdt_l, mask=mask_t, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += tl.load(bias_ptr + h).to(tl.float32)
    dt = _softplus(dt_raw) if SOFTPLUS else dt_raw
    dt = tl.where(mask_t, dt, 0.0)
    # running sum as a masked T x T sum, not tl.cumsum: compiled by triton 3.6 for the H200,
    # tl.cumsum here gave wrong sums for some tile shapes and even illegal memory accesses
    # (benchmarks/NOTES.md, nineteenth session); the interpreter does not show it
    a = dt * (A * 1.4426950408889634)
    steps = tl.arange(0, T)
    cs = tl.sum(tl.where(steps[:, None] >= steps[None, :], a[None, :], 0.0), axis=1)
    cs_last = tl.sum(tl.where(steps == T - 1, cs, 0.0), axis=0)
    return A, dt_raw, dt, cs, cs_last


@triton.jit
def _decays(cs, causal):
    """(T, T) exp(cs_t - cs_s) for s <= t, 0 above the diagonal: the within-chunk decays."""
    return tl.exp2(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))


@triton.jit
def _load_tile(ptr, t, s_l, offs, s_c, mask):
    return tl.load(ptr + t[:, None] * s_l + offs[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _chunk_coords(heads, heads_per_group, head_dim, dstate, length, T: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HB: tl.constexpr):
    """A chunk kernel program's place: batch row b, head block blk (heads blk*HB ...), group g,
    chunk c, its steps t, and the masks of its (step, head_dim) and (step, state) tiles."""
    pid, c = tl.program_id(0), tl.program_id(1)
    blocks = heads // HB
    b, blk = pid // blocks, pid % blocks
    g = blk * HB // heads_per_group
    t = c * T + tl.arange(0, T)
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    mask_t = t < length
    m_tp = mask_t[:, None] & (offs_p < head_dim)[None, :]
    m_tn = mask_t[:, None] & (offs_n < dstate)[None, :]
    return b, blk, g, c, t, offs_p, offs_n, mask_t, m_tp, m_tn


@triton.jit
def _state_tile(ptr, b, h, heads, n_chunks, c, offs_n, offs_p, BLOCK_N: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """Pointers to one head's (BLOCK_N, BLOCK_P) state tile of chunk c in a (batch x heads,
    chunks, BLOCK_N, BLOCK_P) buffer."""
    row = ((b * heads + h) * n_chunks + c).to(tl.int64)  # the buffer can pass 2**31 elements
    return ptr + row * BLOCK_N * BLOCK_P + offs_n[:, None] * BLOCK_P + offs_p[None, :]


@triton.jit
def _ssd_chunk_state_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, b_ptr, states_ptr, decay_ptr,
    length, heads, heads_per_group, head_dim, dstate, n_chunks,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sb_b, sb_l, sb_g, sb_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    HB: tl.constexpr,
):
    """states: (batch x heads, chunks, BLOCK_N, BLOCK_P) fp32 <- S; decay: (batch x heads,
    chunks) fp32 <- exp(cs_T)."""
    b, blk, g, c, t, offs_p, offs_n, mask_t, m_tp, m_tn = _chunk_coords(
        heads, heads_per_group, head_dim, dstate, length, T, BLOCK_P, BLOCK_N, HB)
    Bm = _load_tile(b_ptr + b * sb_b + g * sb_g, t, sb_l, offs_n, sb_n, m_tn).to(tl.float32)
    for i in range(0, HB):
        h = blk * HB + i
        A, dt_raw, dt, cs, cs_last = _head_steps(dt_ptr + b * sdt_b + h * sdt_h, sdt_l, t, mask_t,
                                                 A_ptr, bias_ptr, h, HAS_BIAS, SOFTPLUS, T)
        x = _load_tile(x_ptr + b * sx_b + h * sx_h, t, sx_l, offs_p, sx_p, m_tp)
        xdt = (x.to(tl.float32) * dt[:, None]).to(x_ptr.dtype.element_ty)
        Bw = (Bm * tl.exp2(cs_last - cs)[:, None]).to(x_ptr.dtype.element_ty)
        S = _mm(tl.trans(Bw), xdt, PRECISION, DOT_F32)
        tl.store(_state_tile(states_ptr, b, h, heads, n_chunks, c, offs_n, offs_p, BLOCK_N, BLOCK_P),
                 S.to(states_ptr.dtype.element_ty))
        tl.store(decay_ptr + (b * heads + h) * n_chunks + c, tl.exp2(cs_last))


@triton.jit
def _ssd_state_pass_kernel(states_ptr, passed_ptr, decay_ptr, h0_ptr, hT_ptr, n_chunks, head_dim,
                           dstate, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """Per (batch x head, slice of BLOCK state cells): carry = init (fp32); for each chunk (last
    first if REVERSE): read its fp32 contribution from states, write carry to the same place of
    passed (in passed's dtype), carry = decay * carry + contribution. Then write carry to hT.
    h0 / hT: (batch x heads, head_dim, dstate) contiguous fp32."""
    pid, blk = tl.program_id(0), tl.program_id(1)
    cells = blk * BLOCK + tl.arange(0, BLOCK)  # index into (BLOCK_N, BLOCK_P)
    n, p = cells // BLOCK_P, cells % BLOCK_P
    valid = (n < dstate) & (p < head_dim) & (cells < BLOCK_N * BLOCK_P)
    io = pid * head_dim * dstate + p * dstate + n
    if HAS_INIT:
        carry = tl.load(h0_ptr + io, mask=valid, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK,), dtype=tl.float32)
    row = pid.to(tl.int64) * n_chunks * BLOCK_N * BLOCK_P + cells
    base, out = states_ptr + row, passed_ptr + row
    size: tl.constexpr = BLOCK_N * BLOCK_P
    # the next chunk's contribution and decay are loaded a step ahead: the walk is a chain of
    # loads otherwise, each waiting on memory
    c = n_chunks - 1 if REVERSE else 0
    contribution = tl.load(base + c * size)
    decay = tl.load(decay_ptr + pid * n_chunks + c)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i if REVERSE else i
        # (the last step loads its own chunk again: an address in bounds, a value unused)
        c_next = tl.maximum(c - 1, 0) if REVERSE else tl.minimum(c + 1, n_chunks - 1)
        next_contribution = tl.load(base + c_next * size)
        next_decay = tl.load(decay_ptr + pid * n_chunks + c_next)
        tl.store(out + c * size, carry.to(passed_ptr.dtype.element_ty))
        carry = decay * carry + contribution.to(tl.float32)
        contribution, decay = next_contribution, next_decay
    tl.store(hT_ptr + io, carry, mask=valid)


@triton.jit
def _ssd_chunk_out_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, b_ptr, c_ptr, D_ptr, z_ptr, out_ptr, states_ptr,
    length, heads, heads_per_group, head_dim, dstate, n_chunks,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
    sz_b, sz_l, sz_h, sz_p, so_b, so_l, so_h, so_p,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, HB: tl.constexpr,
):
    b, blk, g, c, t, offs_p, offs_n, mask_t, m_tp, m_tn = _chunk_coords(
        heads, heads_per_group, head_dim, dstate, length, T, BLOCK_P, BLOCK_N, HB)
    offs_t = tl.arange(0, T)
    Bm = _load_tile(b_ptr + b * sb_b + g * sb_g, t, sb_l, offs_n, sb_n, m_tn)
    Cm = _load_tile(c_ptr + b * sc_b + g * sc_g, t, sc_l, offs_n, sc_n, m_tn)
    G = _mm(Cm, tl.trans(Bm), PRECISION, DOT_F32)
    causal = offs_t[:, None] >= offs_t[None, :]
    for i in range(0, HB):
        h = blk * HB + i
        A, dt_raw, dt, cs, cs_last = _head_steps(dt_ptr + b * sdt_b + h * sdt_h, sdt_l, t, mask_t,
                                                 A_ptr, bias_ptr, h, HAS_BIAS, SOFTPLUS, T)
        x = _load_tile(x_ptr + b * sx_b + h * sx_h, t, sx_l, offs_p, sx_p, m_tp)
        xdt = (x.to(tl.float32) * dt[:, None]).to(x_ptr.dtype.element_ty)
        L = _decays(cs, causal)
        y = _mm((G * L).to(xdt.dtype), xdt, PRECISION, DOT_F32)
        H = tl.load(_state_tile(states_ptr, b, h, heads, n_chunks, c, offs_n, offs_p, BLOCK_N, BLOCK_P))
        y += tl.exp2(cs)[:, None] * _mm(Cm, H.to(Cm.dtype), PRECISION, DOT_F32)
        if HAS_D:
            y += tl.load(D_ptr + h).to(tl.float32) * x.to(tl.float32)
        if HAS_Z:
            z = _load_tile(z_ptr + b * sz_b + h * sz_h, t, sz_l, offs_p, sz_p, m_tp).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + b * so_b + h * so_h + t[:, None] * so_l + offs_p[None, :] * so_p,
                 y.to(out_ptr.dtype.element_ty), mask=m_tp)


@triton.jit
def _ssd_chunk_dstate_kernel(
    dt_ptr, A_ptr, bias_ptr, c_ptr, z_ptr, dout_ptr, dstates_ptr,
    length, heads, heads_per_group, head_dim, dstate, n_chunks,
    sdt_b, sdt_l, sdt_h, sc_b, sc_l, sc_g, sc_n, sz_b, sz_l, sz_h, sz_p,
    sdo_b, sdo_l, sdo_h, sdo_p,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    HB: tl.constexpr,
):
    """dstates: (batch x heads, chunks, BLOCK_N, BLOCK_P) fp32 <- (C * exp(cs))^T dy."""
    b, blk, g, c, t, offs_p, offs_n, mask_t, m_tp, m_tn = _chunk_coords(
        heads, heads_per_group, head_dim, dstate, length, T, BLOCK_P, BLOCK_N, HB)
    Cm = _load_tile(c_ptr + b * sc_b + g * sc_g, t, sc_l, offs_n, sc_n, m_tn).to(tl.float32)
    for i in range(0, HB):
        h = blk * HB + i
        A, dt_raw, dt, cs, cs_last = _head_steps(dt_ptr + b * sdt_b + h * sdt_h, sdt_l, t, mask_t,
                                                 A_ptr, bias_ptr, h, HAS_BIAS, SOFTPLUS, T)
        dy = _load_tile(dout_ptr + b * sdo_b + h * sdo_h, t, sdo_l, offs_p, sdo_p, m_tp).to(tl.float32)
        if HAS_Z:
            z = _load_tile(z_ptr + b * sz_b + h * sz_h, t, sz_l, offs_p, sz_p, m_tp).to(tl.float32)
            dy *= z * tl.sigmoid(z)
        Ce = (Cm * tl.exp2(cs)[:, None]).to(c_ptr.dtype.element_ty)
        dS = _mm(tl.trans(Ce), dy.to(c_ptr.dtype.element_ty), PRECISION, DOT_F32)
        tl.store(_state_tile(dstates_ptr, b, h, heads, n_chunks, c, offs_n, offs_p, BLOCK_N, BLOCK_P),
                 dS.to(dstates_ptr.dtype.element_ty))


@triton.jit
def _ssd_chunk_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, b_ptr, c_ptr, D_ptr, z_ptr, dout_ptr, states_ptr, dstates_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dz_ptr, part_ptr, part_stride,
    length, heads, heads_per_group, head_dim, dstate, n_chunks,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
    sz_b, sz_l, sz_h, sz_p, sdo_b, sdo_l, sdo_h, sdo_p, sdx_b, sdx_l, sdx_h, sdx_p,
    sdz_b, sdz_l, sdz_h, sdz_p, sddt_b, sddt_l, sddt_h, sdb_b, sdb_l, sdb_k, sdb_n,
    sdc_b, sdc_l, sdc_k, sdc_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, HB: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """dx, dz, ddt: any strides; dB, dC: (batch, length, groups, dstate), written (a program
    walks all heads of its group) or, if ATOMIC, added in fp32 into zeros (a group's heads are
    split over programs); part: (3, heads, batch, chunks) fp32 <- partial sums of dA, dD and
    dt_bias's gradient (a head's partials adjacent: torch sums them over the last dim)."""
    b, blk, g, c, t, offs_p, offs_n, mask_t, m_tp, m_tn = _chunk_coords(
        heads, heads_per_group, head_dim, dstate, length, T, BLOCK_P, BLOCK_N, HB)
    offs_t = tl.arange(0, T)
    Bm = _load_tile(b_ptr + b * sb_b + g * sb_g, t, sb_l, offs_n, sb_n, m_tn)
    Cm = _load_tile(c_ptr + b * sc_b + g * sc_g, t, sc_l, offs_n, sc_n, m_tn)
    mm_ty = x_ptr.dtype.element_ty  # the dot operands' dtype
    G = _mm(Cm, tl.trans(Bm), PRECISION, DOT_F32)
    causal = offs_t[:, None] >= offs_t[None, :]
    dB = tl.zeros((T, BLOCK_N), dtype=tl.float32)
    dC = tl.zeros((T, BLOCK_N), dtype=tl.float32)
    for i in range(0, HB):
        h = blk * HB + i
        A, dt_raw, dt, cs, cs_last = _head_steps(dt_ptr + b * sdt_b + h * sdt_h, sdt_l, t, mask_t,
                                                 A_ptr, bias_ptr, h, HAS_BIAS, SOFTPLUS, T)
        x32 = _load_tile(x_ptr + b * sx_b + h * sx_h, t, sx_l, offs_p, sx_p, m_tp).to(tl.float32)
        xdt32 = x32 * dt[:, None]
        xdt = xdt32.to(mm_ty)
        # each fp32 tile is reduced as soon as it is made or read, so only the dot operands stay
        # live; <H, dH> takes the saved states as they are (bf16 under autocast)
        H = tl.load(_state_tile(states_ptr, b, h, heads, n_chunks, c, offs_n, offs_p, BLOCK_N, BLOCK_P))
        dH = tl.load(_state_tile(dstates_ptr, b, h, heads, n_chunks, c, offs_n, offs_p, BLOCK_N, BLOCK_P))
        last = tl.exp2(cs_last) * tl.sum(tl.sum(H.to(tl.float32) * dH.to(tl.float32), axis=1), axis=0)
        H, dH = H.to(mm_ty), dH.to(mm_ty)
        # G * L (fp32) is all the rest needs of G and L: dGL = P * L and M = G * dGL = GL * P
        # with P = dy xdt^T, and L is made again from cs where it is needed
        GL32 = G * _decays(cs, causal)
        GL = GL32.to(mm_ty)
        e = tl.exp2(cs)
        eCH = e[:, None] * _mm(Cm, H, PRECISION, DOT_F32)
        Dh = tl.load(D_ptr + h).to(tl.float32) if HAS_D else 0.0
        dout = _load_tile(dout_ptr + b * sdo_b + h * sdo_h, t, sdo_l, offs_p, sdo_p, m_tp).to(tl.float32)
        if HAS_Z:
            z = _load_tile(z_ptr + b * sz_b + h * sz_h, t, sz_l, offs_p, sz_p, m_tp).to(tl.float32)
            y = _mm(GL, xdt, PRECISION, DOT_F32) + eCH + Dh * x32
            sig = tl.sigmoid(z)
            tl.store(dz_ptr + b * sdz_b + h * sdz_h + t[:, None] * sdz_l + offs_p[None, :] * sdz_p,
                     (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                     mask=m_tp)
            dy = dout * z * sig
        else:
            dy = dout
        dcs = tl.sum(dy * eCH, axis=1)
        dD_part = tl.sum(tl.sum(dy * x32, axis=1), axis=0)
        dyc = dy.to(mm_ty)
        w = tl.exp2(cs_last - cs)
        BwdH = _mm((Bm.to(tl.float32) * w[:, None]).to(mm_ty), dH, PRECISION, DOT_F32)
        dxdt = _mm(tl.trans(GL), dyc, PRECISION, DOT_F32) + BwdH
        tl.store(dx_ptr + b * sdx_b + h * sdx_h + t[:, None] * sdx_l + offs_p[None, :] * sdx_p, (dxdt * dt[:, None] + Dh * dy).to(dx_ptr.dtype.element_ty), mask=m_tp)
        ddt_x = tl.sum(dxdt * x32, axis=1)
        r = tl.sum(xdt32 * BwdH, axis=1)
        dcs -= r
        last += tl.sum(r, axis=0)
        P = _mm(dyc, tl.trans(xdt), PRECISION, DOT_F32)                             # (T, T)
        dGLc = (P * _decays(cs, causal)).to(mm_ty)
        M = GL32 * P
        dcs += tl.sum(M, axis=1) - tl.sum(M, axis=0)
        # suffix sums (masked, as the running sum in _head_steps)
        da = tl.sum(tl.where(offs_t[:, None] <= offs_t[None, :], dcs[None, :], 0.0), axis=1) + last
        ddt = da * A + ddt_x
        if SOFTPLUS:
            ddt *= tl.sigmoid(dt_raw)
        ddt = tl.where(mask_t, ddt, 0.0)
        tl.store(ddt_ptr + b * sddt_b + h * sddt_h + t * sddt_l, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_t)
        part = part_ptr + h * (part_stride // heads) + b * n_chunks + c
        tl.store(part, tl.sum(da * dt, axis=0))
        tl.store(part + part_stride, dD_part)
        tl.store(part + 2 * part_stride, tl.sum(ddt, axis=0))
        # dB and dC last: their fp32 tiles are not live through the step sums above
        dC += _mm(dGLc, Bm, PRECISION, DOT_F32) + e[:, None] * _mm(dyc, tl.trans(H), PRECISION, DOT_F32)
        dB += _mm(tl.trans(dGLc), Cm, PRECISION, DOT_F32) + w[:, None] * _mm(
            xdt, tl.trans(dH), PRECISION, DOT_F32)
    if ATOMIC:  # relaxed: the sums' order varies from run to run (as in the Mamba-1 scan's)
        tl.atomic_add(dB_ptr + b * sdb_b + g * sdb_k + t[:, None] * sdb_l + offs_n[None, :] * sdb_n,
                      dB, mask=m_tn, sem="relaxed")
        tl.atomic_add(dC_ptr + b * sdc_b + g * sdc_k + t[:, None] * sdc_l + offs_n[None, :] * sdc_n,
                      dC, mask=m_tn, sem="relaxed")
    else:
        tl.store(dB_ptr + b * sdb_b + g * sdb_k + t[:, None] * sdb_l + offs_n[None, :] * sdb_n,
                 dB.to(dB_ptr.dtype.element_ty), mask=m_tn)
        tl.store(dC_ptr + b * sdc_b + g * sdc_k + t[:, None] * sdc_l + offs_n[None, :] * sdc_n,
                 dC.to(dC_ptr.dtype.element_ty), mask=m_tn)


def ssd_config(head_dim: int, dstate: int, heads_per_group: int, backward: bool = False) -> dict:
    """Chunk length T, warps and pipeline stages of the chunk kernels (dot tiles need every
    side >= 16), and HB, the heads a program walks (a divisor of heads_per_group: B, C and
    C B^T are loaded and made once for them, and the backward sums their dB and dC in
    registers). Measured on the H200 at 8 x 8192, 24 heads of 64, state 64 (`python
    benchmarks/ssd.py --shapes 1 --no-ref --tune`; results/ssd-h200.md): T=64 with 4 warps and
    one head a program is fastest both ways (forward 1.17 ms against 1.50 with 4 heads; backward
    4.71 against 7.08: the many live tiles of a second head leave the registers no room)."""
    return dict(T=64, num_warps=4, num_stages=1, HB=1)


# the largest (head_dim x state) tile in bytes of the dot operands' dtype: bf16 64 x 256 and
# 128 x 128 train on the H200 (twentieth session); the backward at bf16 128 x 256 asks for
# 272 KB of shared memory (it has 227 KB). fp32 tiles count twice: 64 x 128 and 128 x 64 pass
# (on the H200, twenty-first session), 128 x 128 does not (~272 KB by an offline compile).
MAX_TILE_BYTES = 64 * 256 * 2


def tile_sizes(head_dim: int, dstate: int, itemsize: int = 2) -> tuple[int, int]:
    """BLOCK_P, BLOCK_N: head_dim and dstate padded to powers of two (dot tiles need >= 16).
    itemsize: bytes an element of the dot operands (x's dtype).

    With a state of 64 or more, head_dim's tile is at least 64. Triton 3.6 on the H200 compiled
    the output kernel wrong for head_dim 16 or 32 with state 64 or 128 in bf16: C's shared-memory
    tile, read by two tensor-core products of different widths (C B^T, 64 wide, and C H,
    head_dim wide), gave wrong outputs and out-of-bounds shared-memory reads (compute-sanitizer:
    `Invalid __shared__ read`, in the dot of `_mm`). A 64-wide head tile gives every product of
    the kernel the same width; the extra columns are masked, at the cost of 2-4x the work and
    the saved states for head_dim 32 or 16 (benchmarks/NOTES.md, twentieth session)."""
    block_p, block_n = max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(dstate))
    if block_n >= 64:
        block_p = max(block_p, 64)
    if block_p * block_n * itemsize > MAX_TILE_BYTES:
        raise ValueError(
            f"ssd: head_dim {head_dim} with d_state {dstate} makes a {block_p} x {block_n} tile that "
            f"does not fit the Triton kernels' shared memory in {itemsize}-byte elements (at most "
            f"{MAX_TILE_BYTES // itemsize} cells, e.g. 64 x 256 in bf16); use scan_backend='ref' "
            f"or a smaller head_dim or d_state")
    return block_p, block_n


def _launch_setup(x, B, cfg, backward=False):
    """The kernels' constants and the grid for the chunk kernels."""
    batch, length, heads, head_dim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    cfg = cfg or ssd_config(head_dim, dstate, heads // groups, backward)
    hb = cfg.get("HB", 1)
    if (heads // groups) % hb:
        raise ValueError(f"ssd: HB {hb} does not divide the {heads // groups} heads of a group")
    BLOCK_P, BLOCK_N = tile_sizes(head_dim, dstate, x.element_size())
    k = dict(T=cfg["T"], BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, HB=hb,
             PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
             DOT_F32=_INTERPRET and x.dtype != torch.float32, num_warps=cfg["num_warps"],
             num_stages=cfg.get("num_stages", 1))
    n_chunks = triton.cdiv(length, cfg["T"])
    common = (length, heads, heads // groups, head_dim, dstate, n_chunks)
    return k, (batch * heads // hb, n_chunks), common


def check_offsets(*tensors):
    """The kernels index their inputs and outputs with 32-bit offsets: a one-line error, not a
    silent wrap, for a tensor whose elements lie 2**31 or more apart."""
    for t in tensors:
        if t is not None and t.numel() and sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"ssd: a {tuple(t.shape)} tensor spans 2**31 elements or more; the "
                             f"Triton kernels index with 32 bits: split the batch")


def dense_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty dense tensor of t's shape and dtype (or `dtype`) whose dims are laid out in the
    order of t's strides: a gradient written there is in its input's layout (e.g. rows of a
    channel-major buffer), so the views and splits that made the input pass it back without a
    copy."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))  # innermost first
    strides, step = [0] * t.dim(), 1
    for d in order:
        strides[d] = step
        step *= t.shape[d]
    return _empty_strided(t.shape, strides, device=t.device, dtype=dtype or t.dtype)


def _state_pass(states, decay, h0, head_dim, dstate, reverse, out_dtype):
    """The pass over chunks: returns the state carried into every chunk (in out_dtype, the dot
    operands' dtype) and the final carry (fp32).

    The carried states go to a new buffer, not over the fp32 contributions: on the H200 the
    pass written in place took 0.41 ms at 8 x 8192 x 24 heads and 1.1 ms at 2 x 32768; into a
    separate fp32 buffer 0.21 / 0.25, in bf16 0.16 / 0.20 (benchmarks/NOTES.md, twenty-first
    session). bf16 halves what the output and backward kernels read; their dots round the
    state to bf16 anyway, and only the backward's <H, dH> sum now sees bf16 values where it
    saw fp32 (mamba_ssm passes its states in C's dtype too)."""
    rows, n_chunks = decay.shape
    _, _, BLOCK_N, BLOCK_P = states.shape
    carry = _empty(rows, head_dim, dstate, device=states.device, dtype=torch.float32)
    passed = _empty(states.shape, device=states.device, dtype=out_dtype)
    BLOCK = min(1024, BLOCK_N * BLOCK_P)
    _ssd_state_pass_kernel[(rows, triton.cdiv(BLOCK_N * BLOCK_P, BLOCK))](
        states, passed, decay, h0 if h0 is not None else carry, carry, n_chunks, head_dim, dstate,
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, BLOCK=BLOCK, REVERSE=reverse, HAS_INIT=h0 is not None,
        num_warps=4)
    return passed, carry


def _strides(t, n=4):
    return t.stride() if t is not None else (0,) * n


def ssd_fwd(x, dt, A, B, C, D, z, dt_bias, softplus, h0, cfg=None):
    """Launch the forward. Returns out (batch, length, heads, head_dim) contiguous, the final
    state, and what the backward reads: the state entering every chunk (batch x heads, chunks,
    BLOCK_N, BLOCK_P) in x's dtype and the chunks' decays (batch x heads, chunks) fp32."""
    batch, length, heads, head_dim = x.shape
    dstate = B.shape[3]
    k, grid, common = _launch_setup(x, B, cfg)
    dev = x.device
    states = _empty(batch * heads, grid[1], k["BLOCK_N"], k["BLOCK_P"], device=dev, dtype=torch.float32)
    decay = _empty(batch * heads, grid[1], device=dev, dtype=torch.float32)
    _ssd_chunk_state_kernel[grid](x, dt, A, dt_bias if dt_bias is not None else A, B, states, decay,
                              *common, *x.stride(), *dt.stride(), *B.stride(),
                              HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, **k)
    states, hT = _state_pass(states, decay, h0, head_dim, dstate, reverse=False, out_dtype=x.dtype)
    out = _empty(x.shape, device=dev, dtype=x.dtype)
    _ssd_chunk_out_kernel[grid](
        x, dt, A, dt_bias if dt_bias is not None else A, B, C, D if D is not None else A,
        z if z is not None else x, out, states, *common,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *_strides(z), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, **k)
    return out, hT.view(batch, heads, head_dim, dstate), states, decay


def ssd_bwd(x, dt, A, B, C, D, z, dt_bias, softplus, states, decay, dout, dhT, cfg=None,
            dx=None, dB=None, dC=None, ddt=None):
    """Launch the backward. Returns dx, ddt, dA, dB, dC, dD, dz, dbias, dh0; dx, dB, dC and ddt
    are written where given (views of one buffer, any strides), else into new tensors laid
    out like their inputs (dense_like)."""
    batch, length, heads, head_dim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    k, grid, common = _launch_setup(x, B, cfg, backward=True)
    n_chunks = grid[1]
    dev = x.device
    dstates = _empty(states.shape, device=dev, dtype=torch.float32)
    _ssd_chunk_dstate_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, C, z if z is not None else dout, dout, dstates,
        *common, *dt.stride(), *C.stride(), *_strides(z), *dout.stride(),
        HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, **k)
    dstates, dh0 = _state_pass(dstates, decay, dhT.reshape(batch * heads, head_dim, dstate).contiguous()
                      if dhT is not None else None, head_dim, dstate, reverse=True, out_dtype=x.dtype)
    dx = dense_like(x) if dx is None else dx
    dz = dense_like(z) if z is not None else None
    ddt = dense_like(dt) if ddt is None else ddt
    dB = dense_like(B) if dB is None else dB
    dC = dense_like(C) if dC is None else dC
    # a group's heads over several programs: their dB and dC are added up by fp32 atomics (in
    # L2: the sums are 2 x 16 MB at 8 x 8192), not written per head and summed by torch (2 x 400
    # MB each way; 3.99 -> 3.71 ms fwd+bwd at 8 x 8192 x 24 heads, benchmarks/NOTES.md)
    atomic = heads // groups // k["HB"] > 1
    if atomic:  # the sums in dB's and dC's own layouts: the casts below are plain copies (the
        # mixer's are rows of a channel-major buffer; a transposing copy took 1.4 ms of its
        # 2 x 32768 step on the H200, benchmarks/NOTES.md, twenty-second session)
        dB_sum = dense_like(dB, torch.float32).zero_()
        dC_sum = dense_like(dC, torch.float32).zero_()
    else:  # a program walks all its group's heads: it writes dB, dC itself
        dB_sum, dC_sum = dB, dC
    part = _empty(3, heads, batch, n_chunks, device=dev, dtype=torch.float32)
    _ssd_chunk_bwd_kernel[grid](
        x, dt, A, dt_bias if dt_bias is not None else A, B, C, D if D is not None else A,
        z if z is not None else dout, dout, states, dstates, dx, ddt, dB_sum, dC_sum,
        dz if dz is not None else dx, part, part[0].numel(), *common,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *_strides(z), *dout.stride(),
        *dx.stride(), *_strides(dz), *ddt.stride(), *dB_sum.stride(), *dC_sum.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus,
        ATOMIC=atomic, **k)
    if atomic:
        dB.copy_(dB_sum)
        dC.copy_(dC_sum)
    dA, dD, dbias = part.view(3, heads, -1).sum(-1)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0.view(batch, heads, head_dim, dstate)


def _save(ctx, softplus, h0, states, decay, *tensors):
    ctx.save_for_backward(*tensors, states, decay)
    ctx.softplus, ctx.has_h0 = softplus, h0 is not None
    # an unused output's gradient arrives as None, not as zeros: an unused final state then
    # sends nothing through the reverse pass
    ctx.set_materialize_grads(False)


class SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, softplus, h0, return_final):
        out, hT, states, decay = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, softplus, h0)
        _save(ctx, softplus, h0, states, decay, x, dt, A, B, C, D, z, dt_bias)
        return (out, hT) if return_final else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhT=None):
        x, dt, A, B, C, D, z, dt_bias, states, decay = ctx.saved_tensors
        dout = torch.zeros_like(x) if dout is None else dout
        dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = ssd_bwd(
            x, dt, A, B, C, D, z, dt_bias, ctx.softplus, states, decay, dout, dhT)
        return (dx, ddt, dA, dB, dC, dD if D is not None else None, dz,
                dbias if dt_bias is not None else None, None, dh0 if ctx.has_h0 else None, None)


class SSDxBCFn(torch.autograd.Function):
    """The scan reading x, B and C from one (batch, length, conv_dim) tensor (the Mamba-2
    conv's output) and writing their gradients into one buffer laid out like it."""

    @staticmethod
    def forward(ctx, xbc, dt, A, D, z, dt_bias, softplus, h0, return_final, head_dim, groups,
                dstate):
        ctx.shape = (head_dim, groups, dstate)
        x, B, C = split_xbc(xbc, *ctx.shape)
        out, hT, states, decay = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, softplus, h0)
        _save(ctx, softplus, h0, states, decay, xbc, dt, A, D, z, dt_bias)
        return (out, hT) if return_final else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhT=None):
        xbc, dt, A, D, z, dt_bias, states, decay = ctx.saved_tensors
        dxbc = dense_like(xbc)
        dx, dB, dC = split_xbc(dxbc, *ctx.shape)
        x, B, C = split_xbc(xbc, *ctx.shape)
        dout = x.new_zeros(x.shape) if dout is None else dout
        _, ddt, dA, _, _, dD, dz, dbias, dh0 = ssd_bwd(
            x, dt, A, B, C, D, z, dt_bias, ctx.softplus, states, decay, dout, dhT,
            dx=dx, dB=dB, dC=dC)
        return (dxbc, ddt, dA, dD if D is not None else None, dz,
                dbias if dt_bias is not None else None, None, dh0 if ctx.has_h0 else None,
                None, None, None, None)


def _params(A, D, dt_bias, initial_state):
    """fp32 parameters; the initial state contiguous (the pass kernel reads it so)."""
    return (A.float(), D.float() if D is not None else None,
            dt_bias.float() if dt_bias is not None else None,
            initial_state.float().contiguous() if initial_state is not None else None)


def ssd_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
               return_final_state=False):
    """The SSD scan on the Triton kernels; arguments and results as bytelm.ops.ssd.ssd_ref.
    fp64 inputs take the reference (the kernels compute in fp32)."""
    check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state)
    if x.dtype == torch.float64 or x.shape[1] == 0:
        return ssd_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state)
    A, D, dt_bias, h0 = _params(A, D, dt_bias, initial_state)
    B, C = B.to(x.dtype), C.to(x.dtype)  # dot operands share x's dtype
    check_offsets(x, dt, B, C, z)
    if not needs_autograd(x, dt, A, B, C, D, z, dt_bias, h0):
        out, hT, _, _ = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0)
        return (out, hT) if return_final_state else out
    return SSDFn.apply(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, return_final_state)


def ssd_xbc_triton(xbc, dt, A, D=None, z=None, dt_bias=None, dt_softplus=False, head_dim=64,
                   n_groups=1, d_state=64, initial_state=None, return_final_state=False):
    """As bytelm.ops.ssd.ssd_xbc_ref, on the Triton kernels: x, B and C's gradients land in one
    buffer laid out like xbc."""
    x, B, C = split_xbc(xbc, head_dim, n_groups, d_state)
    check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state)
    if xbc.dtype == torch.float64 or xbc.shape[1] == 0:
        return ssd_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state)
    A, D, dt_bias, h0 = _params(A, D, dt_bias, initial_state)
    check_offsets(xbc, dt, z)
    if not needs_autograd(xbc, dt, A, D, z, dt_bias, h0):
        out, hT, _, _ = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0)
        return (out, hT) if return_final_state else out
    return SSDxBCFn.apply(xbc, dt, A, D, z, dt_bias, dt_softplus, h0, return_final_state,
                          head_dim, n_groups, d_state)
