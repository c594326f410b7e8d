"""Triton kernels of the fused selective scan; launched and documented by `selective_scan.py`.

Layout: every scan kernel works on 5-d tiles (time, state-in-thread, warp, state-lane,
channel-lane) built by `_tile_index`; the per-step work is written inline (no jit helper calls
per step, a few per chunk) because under TRITON_INTERPRET each such call costs milliseconds.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.standard import _sum_combine as _add  # tl.sum without its jit wrapper
from triton.language.standard import _log2 as _ilog2  # log2 of a constexpr int


# --------------------------------------------------------------------------------------------
# small jit helpers (the scan kernels inline their per-step work instead: under TRITON_INTERPRET
# every call of a jit function costs milliseconds, which the CPU tests cannot afford per step)
# --------------------------------------------------------------------------------------------
@triton.jit
def _log2(x, FAST: tl.constexpr):
    # lg2.approx on the GPU; the interpreter has no fast_log2f
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    # 1 / x: rcp.approx without div.full's range scaling on the GPU (4 instructions fewer)
    if FAST:
        return libdevice.fast_dividef(1.0, x)
    else:
        return tl.fdiv(1.0, x, ieee_rounding=False)


@triton.jit
def _softplus(x):
    """log(1 + e^x), and x itself above 20 like torch.nn.functional.softplus."""
    return tl.where(x > 20.0, x, tl.log2(1.0 + tl.exp2(x * 1.4426950408889634)) * 0.6931471805599453)


@triton.jit
def _sigmoid(x):
    return tl.fdiv(1.0, 1.0 + tl.exp2(-x * 1.4426950408889634), ieee_rounding=False)


@triton.jit
def _prefetch_l1(p, NEL: tl.constexpr, ON: tl.constexpr):
    """Hint the NEL elements at p (128-byte aligned: packed B or C chunks) into L1 ahead of
    their load: prefetch.global.L1, one a line, nothing held in registers (a load a chunk ahead
    holds NEL / 32 values a lane until used). ON false (the interpreter, which runs no inline
    PTX, or a prefetch distance of 0): nothing."""
    if ON:
        EL: tl.constexpr = 1024 // p.dtype.element_ty.primitive_bitwidth   # elements a line
        for i in tl.static_range((NEL + EL - 1) // EL):
            tl.inline_asm_elementwise("prefetch.global.L1 [$1];\nmov.u32 $0, 0;", "=r,l",
                                      [p + i * EL], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _step_sum(x, LANE: tl.constexpr, AX_KN: tl.constexpr):
    """A per-(step, channel) accumulator summed over steps: over the time axis, and with LANE
    (one step a state lane, the lanes kn >= T left at zero) over the state lanes too."""
    x = tl.reduce(x, 0, _add, keep_dims=True)
    if LANE:
        x = tl.reduce(x, AX_KN, _add, keep_dims=True)
    return x


@triton.jit
def _from_lanes(x, T: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr, LD: tl.constexpr,
                ASC: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr, AX_KN: tl.constexpr,
                AX_LD: tl.constexpr, S: tl.constexpr, HALF: tl.constexpr):
    """LANE layout -> time axis: x holds S steps a state lane on its time axis, steps kn * S ..
    kn * S + S - 1 on lane kn (S = 1: step kn of the chunk, kn < T; S = G T / KN, chunk pairs
    (G = 2) or quads (G = 4): step kn * S + s of the group); returns the group's chunk HALF's T
    steps (HALF = 0 without groups) in every lane. An all-gather over a (WD, lane, T) reshape, lane = kn * LD + ld: pair
    step p = HALF * T + t read from lane (p // S) * LD + ld, its value p % S: one shuffle a value
    and step (with S = 2 each value's gather is written for every step and the select on t % 2,
    a constant a register, leaves one; a masked sum over the state lanes per step took log2(KN)
    shuffles and adds; tl.gather on the 5-d tiles, or over KN alone, lays its axis on the
    fastest lanes, the channels', and converts the tiles around it)."""
    Q = tl.reshape(tl.permute(x, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, S))
    lane = tl.arange(0, KN * LD)[None, :, None]
    step = tl.arange(0, T)[None, None, :]
    src = lane % LD + (HALF * T + step) // S * LD + tl.zeros((WD, KN * LD, T), tl.int32)
    if S == 1:
        G = tl.gather(tl.broadcast_to(Q, (WD, KN * LD, T)), src, 1)
    elif S == 2:
        Q0, Q1 = tl.split(Q)
        G = tl.where(step % 2 == 0,
                     tl.gather(tl.broadcast_to(Q0[:, :, None], (WD, KN * LD, T)), src, 1),
                     tl.gather(tl.broadcast_to(Q1[:, :, None], (WD, KN * LD, T)), src, 1))
    else:  # S == 4 (chunk quads): value v = 2 i + j split on j, then on i
        tl.static_assert(S == 4)
        Qe, Qo = tl.split(tl.reshape(Q, (WD, KN * LD, 2, 2)))
        Q0, Q2 = tl.split(Qe)
        Q1, Q3 = tl.split(Qo)
        v = (HALF * T + step) % 4
        G = tl.where(v == 0, tl.gather(tl.broadcast_to(Q0[:, :, None], (WD, KN * LD, T)), src, 1),
                     tl.where(v == 1, tl.gather(tl.broadcast_to(Q1[:, :, None], (WD, KN * LD, T)), src, 1),
                              tl.where(v == 2,
                                       tl.gather(tl.broadcast_to(Q2[:, :, None], (WD, KN * LD, T)), src, 1),
                                       tl.gather(tl.broadcast_to(Q3[:, :, None], (WD, KN * LD, T)), src, 1))))
    G = tl.reshape(G, (WD, KN, LD, 1, T))
    if ASC:  # back to the tiles' dims
        return tl.permute(G, (4, 2, 1, 0, 3))
    else:
        return tl.permute(G, (4, 3, 0, 1, 2))


@triton.jit
def _scatter_rounds(Q, WD: tl.constexpr, KN: tl.constexpr, LD: tl.constexpr, ASC: tl.constexpr):
    """A reduce-scatter over the state lanes: Q (WD, KN * LD, V) holds each lane's partial sums
    of V values (lane = kn * LD + ld, V a multiple of KN); returns the sums of values kn * S ..
    kn * S + S - 1 (S = V / KN) on state lane kn, as a tile with S on its time axis. Each round
    a lane keeps the half of its values whose top bit matches its own kn's bit of that round,
    sends the other half to the partner (kn xor that bit) and adds what it receives: log2(KN)
    rounds, one shuffle per value and round (a butterfly shuffles all V values log2(KN) times).
    tl.gather lays its axis out on the fastest lanes, which in the tiles are the channels', so
    the rounds run on this (WD, lane, V) reshape (a gather over KN alone, or on the 5-d tiles,
    would add layout conversions)."""
    V: tl.constexpr = Q.shape[2]
    lane = tl.arange(0, KN * LD)[None, :, None]
    for lvl in tl.static_range(_ilog2(KN)):
        # a: the values whose top bit is 0, b: 1; the round's state lane bit is Q.shape[2] * KN
        # // (2 V) (KN / 2, KN / 4, ...; inline: names assigned in a static_range body stop
        # being constexprs)
        a, b = tl.split(tl.permute(tl.reshape(Q, (WD, KN * LD, 2, Q.shape[2] // 2)), (0, 1, 3, 2)))
        up = (lane & (Q.shape[2] * KN // (2 * V) * LD)) != 0
        send = tl.where(up, a, b)
        keep = tl.where(up, b, a)
        Q = keep + tl.gather(send, (lane ^ (Q.shape[2] * KN // (2 * V) * LD))
                             + tl.zeros((WD, KN * LD, Q.shape[2] // 2), tl.int32), 1)
    if V == KN:
        Q = tl.reshape(Q, (WD, KN, LD))
        if ASC:  # back to the tiles' dims
            return tl.permute(Q, (2, 1, 0))[None, :, :, :, None]
        else:
            return Q[None, None, :, :, :]
    else:
        Q = tl.reshape(Q, (WD, KN, LD, V // KN))
        if ASC:
            return tl.permute(Q, (3, 2, 1, 0))[:, :, :, :, None]
        else:
            return tl.permute(Q, (3, 0, 1, 2))[:, None, :, :, :]


@triton.jit
def _state_sum(x, t_, ts_, LANE: tl.constexpr, T: tl.constexpr, WD: tl.constexpr,
               KN: tl.constexpr, LD: tl.constexpr, ASC: tl.constexpr, AX_NPT: tl.constexpr,
               AX_WD: tl.constexpr, AX_KN: tl.constexpr, AX_LD: tl.constexpr):
    """x summed over a channel's states per step: without LANE on every lane's time axis, with
    LANE in its layout (each state lane holds its own step ts_ of the sums)."""
    return _lanes_sum(tl.reduce(x, AX_NPT, _add, keep_dims=True), t_, ts_, LANE, T, WD, KN, LD,
                      ASC, AX_NPT, AX_WD, AX_KN, AX_LD)


@triton.jit
def _lanes_sum(x, t_, ts_, LANE: tl.constexpr, T: tl.constexpr, WD: tl.constexpr,
               KN: tl.constexpr, LD: tl.constexpr, ASC: tl.constexpr, AX_NPT: tl.constexpr,
               AX_WD: tl.constexpr, AX_KN: tl.constexpr, AX_LD: tl.constexpr):
    """`_state_sum` of x already summed over its thread's states (AX_NPT of size 1)."""
    if not LANE:
        x = tl.reduce(x, AX_KN, _add, keep_dims=True)
    elif KN == T:
        # state lane kn ends with step kn's sum
        x = _scatter_rounds(tl.reshape(tl.permute(x, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, T)),
                            WD, KN, LD, ASC)
    else:
        # KN a multiple of T: a butterfly over the state lanes, then each lane's own step
        x = tl.reduce(x, AX_KN, _add, keep_dims=True)
        x = tl.reduce(tl.where(t_ == ts_, x, 0.0), 0, _add, keep_dims=True)
    return x


@triton.jit
def _pair_sum(xa, xb, T: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr, LD: tl.constexpr,
              ASC: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr, AX_KN: tl.constexpr,
              AX_LD: tl.constexpr):
    """Two chunks' per-step sums (xa the earlier chunk's, xb the later's, each summed over its
    thread's states) summed over the state lanes into the pair layout: steps kn * S .. kn * S +
    S - 1 of the pair (S = 2T / KN) on state lane kn, the pair's steps in order."""
    Qa = tl.reshape(tl.permute(xa, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, T))
    Qb = tl.reshape(tl.permute(xb, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, T))
    Q = tl.reshape(tl.permute(tl.join(Qa, Qb), (0, 1, 3, 2)), (WD, KN * LD, 2 * T))
    return _scatter_rounds(Q, WD, KN, LD, ASC)


@triton.jit
def _quad_sum(xa, xb, xc, xd, T: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr,
              LD: tl.constexpr, ASC: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr,
              AX_KN: tl.constexpr, AX_LD: tl.constexpr):
    """`_pair_sum` for four chunks in time order (xa the earliest): steps kn * S .. kn * S + S - 1
    of the quad (S = 4T / KN) on state lane kn."""
    Qa = tl.reshape(tl.permute(xa, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, T))
    Qb = tl.reshape(tl.permute(xb, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, T))
    Qc = tl.reshape(tl.permute(xc, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, T))
    Qd = tl.reshape(tl.permute(xd, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (WD, KN * LD, T))
    # (WD, lanes, T, chunk in pair, pair) -> value (2 pair + chunk in pair) T + t
    Q = tl.join(tl.join(Qa, Qb), tl.join(Qc, Qd))
    Q = tl.reshape(tl.permute(Q, (0, 1, 4, 3, 2)), (WD, KN * LD, 4 * T))
    return _scatter_rounds(Q, WD, KN, LD, ASC)


@triton.jit
def _lane_steps(t_, kn_, T: tl.constexpr, LANE: tl.constexpr):
    """The step of its chunk each lane does the per-(step, channel) work for, and which lanes
    do it: with LANE, state lane kn takes step kn (lanes kn >= T repeat and are masked off);
    else every lane takes all T (the time axis)."""
    if LANE:
        # contiguity hint 1: adjacent state lanes read adjacent steps, but they must stay laid
        # out as the tiles' lanes (a load's contiguous dim gets a layout of its own)
        return tl.max_contiguous(kn_ % T, [1, 1, 1, 1, 1]), kn_ < T
    else:
        return t_, kn_ * 0 == 0


@triton.jit
def _pair_steps(kn_, T: tl.constexpr, KN: tl.constexpr, G: tl.constexpr):
    """Chunk pairs (G = 2; KN = T or 2T) or quads (G = 4): the steps of its group each state
    lane takes, kn * S .. kn * S + S - 1 (S = G T / KN) on the time axis of the tiles. Contiguity hint S (the lane's adjacent
    steps in-thread, one wide access), not KN * S across the lanes: the tiles' lanes must stay
    the load's (see `_lane_steps`)."""
    S: tl.constexpr = G * T // KN
    return tl.max_contiguous(kn_ * S + tl.arange(0, S)[:, None, None, None, None], [S, 1, 1, 1, 1])


@triton.jit
def _fwd_states(h, dA, dBu, t_, T: tl.constexpr):
    """The forward's recurrence over a chunk from h: returns the state after it and the
    chunk's states H (time axis). Step k of a tile: its time axis is in-thread, so each sum
    folds to a register read (NEG0 = -0.0 because x + -0.0 == x exactly; a literal -0.0 would
    not do: Triton makes a scalar equal to 0 its null value, +0.0, which costs an FADD per
    element)."""
    NEG0 = tl.full([1], -2147483648, tl.int32).to(tl.float32, bitcast=True)   # -0.0
    H = tl.zeros_like(dBu)
    for k in tl.static_range(T):
        at_k = t_ == k
        h = (tl.reduce(tl.where(at_k, dA, NEG0), 0, _add, keep_dims=True) * h
             + tl.reduce(tl.where(at_k, dBu, NEG0), 0, _add, keep_dims=True))
        H = tl.where(at_k, h, H)
    return h, H


@triton.jit
def _store_piece(state_ptr, lam_ptr, slot, h, lam, n, d, kn_, mask_dn, mask_row, NSTATE, DIM,
                 LANE: tl.constexpr, AX_KN: tl.constexpr):
    """A pre-pass program's results for its (batch row, sub-segment) `slot`: the state (or,
    backward, the state's gradient) h into (batch, sub-segment, state, dim) and the summed step
    sizes lam (`_step_sum`) into (batch, sub-segment, dim), what the main kernels' combination
    loops read."""
    off = tl.max_contiguous(slot * NSTATE * DIM + n * DIM + d, [1, 1, 1, 1, 1])
    tl.store(state_ptr + off, h, mask=mask_dn)
    tl.store(lam_ptr + slot * DIM + d + kn_ * 0, _step_sum(lam, LANE, AX_KN),
             mask=mask_row & (kn_ == 0))


@triton.jit
def _own_step(x, t_, ts_, T: tl.constexpr):
    """x (a row tile: its T steps in-thread) at each lane's own step ts_ (`_lane_steps`, LANE):
    register reads and T - 1 selects. Replaces a second load of the row one step a lane, whose
    2 bytes a lane over 8 channels' rows cost the L1 as many wavefronts as the whole row."""
    NEG0 = tl.full([1], -2147483648, tl.int32).to(tl.float32, bitcast=True)   # -0.0
    r = tl.reduce(tl.where(t_ == 0, x, NEG0), 0, _add, keep_dims=True)
    for k in tl.static_range(1, T):
        r = tl.where(ts_ == k, tl.reduce(tl.where(t_ == k, x, NEG0), 0, _add, keep_dims=True), r)
    return r


# --------------------------------------------------------------------------------------------
# the 5-d tile layout
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_index(T: tl.constexpr, NPT: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr,
                LD: tl.constexpr, ASC: tl.constexpr):
    """Index tensors (time, state-in-thread, warp, state-lane, channel-lane) of the 5-d tiles.

    Time is dim 0 (contiguous in memory, so Triton keeps it in-thread). Triton hands lanes to
    the other dims in an order that depends on its version (dim order on 3.6, reverse dim order
    on 3.9; `tie_order_ascending` probes it), so the dims are placed for each case such that
    the channel lanes come first, then the state lanes, then warps, and NPT stays in-thread.
    """
    t_ = tl.arange(0, T)[:, None, None, None, None]
    if ASC:
        ld_ = tl.arange(0, LD)[None, :, None, None, None]
        kn_ = tl.arange(0, KN)[None, None, :, None, None]
        wd_ = tl.arange(0, WD)[None, None, None, :, None]
        np_ = tl.arange(0, NPT)[None, None, None, None, :]
    else:
        np_ = tl.arange(0, NPT)[None, :, None, None, None]
        wd_ = tl.arange(0, WD)[None, None, :, None, None]
        kn_ = tl.arange(0, KN)[None, None, None, :, None]
        ld_ = tl.arange(0, LD)[None, None, None, None, :]
    return t_, np_, wd_, kn_, ld_


@triton.jit
def _fwd_step_sizes(dl, bias, m, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    FAST_LOG: tl.constexpr):
    """Step sizes from raw delta: + delta_bias, softplus (torch's: x itself above 20), 0 where
    not m (steps past the end or outside the segment: decay 1, no input)."""
    dt = dl.to(tl.float32)
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, _log2(1.0 + tl.exp2(dt * 1.4426950408889634), FAST_LOG) * 0.6931471805599453)
    return tl.where(m, dt, 0.0)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, hseg_ptr, lseg_ptr,
    out_ptr, hlast_ptr, ckpt_ptr,
    L, DIM, NSTATE, n_chunks, CPS, NSEG, SUB, NSUB, SB, SD, ST, ZB, ZD, ZT,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_CKPT: tl.constexpr, FAST_LOG: tl.constexpr,
    PIPELINE: tl.constexpr, US_ROW: tl.constexpr, PAIR: tl.constexpr, QUADS: tl.constexpr,
    T: tl.constexpr, NPT: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr, LD: tl.constexpr,
    ASC: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr, AX_KN: tl.constexpr,
    AX_LD: tl.constexpr, LANE: tl.constexpr, PRE: tl.constexpr = False,
):
    """Program (batch row, channel block, segment): the segment's CPS chunks of T steps.
    The pre-pass cut the sequence finer, into NSUB sub-segments of CPS / SUB chunks (SUB a
    segment): this segment starts from the first seg * SUB of them.
    PRE (chunk pairs or quads only): this launch is that pre-pass, program (batch row, channel
    block, sub-segment of CPS chunks): the sub-segment's end state from zero and its summed
    step sizes into hseg, lseg; no C, output, z, D or checkpoints. The pair loop's wide
    accesses make it cheaper than `_scan_fwd_segment_kernel`'s one chunk at a time.
    LANE (KN % T == 0 only; scan_config: lane_steps, lane_steps_ckpt): the per-(step, channel) work --
    softplus, gate, D, the output -- done once, state lane kn taking step kn of the chunk,
    instead of by every state lane for every step; the step sizes reach the other lanes by
    shuffles (`_from_lanes`)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    tl.static_assert(PAIR or not PRE)   # the pre-pass runs the pair / quad loop alone
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2)
    t_, np_, wd_, kn_, ld_ = _tile_index(T, NPT, WD, KN, LD, ASC)
    d = pid_d * (WD * LD) + wd_ * LD + ld_                  # channel
    n = kn_ * NPT + np_                                     # state (B, C padded to the block)
    BN: tl.constexpr = NPT * KN
    mask_d = d < DIM
    mask_dn = mask_d & (n < NSTATE)
    zero_kn = kn_ * 0                                       # spreads per-channel tiles over KN
    mask_row = mask_d & (zero_kn == 0)

    # per-(channel, state) constants; A pre-scaled so that exp2 gives exp
    A2 = tl.load(A_ptr + d * NSTATE + n, mask=mask_dn, other=0.0) * LOG2E
    bias = 0.0          # (unused without delta_bias)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d + zero_kn, mask=mask_d, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + d + zero_kn, mask=mask_d, other=0.0)
    state_off = (pid_b * DIM + d) * NSTATE + n               # into (batch, dim, state)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros_like(A2)
    # the state entering this segment: run the earlier sub-segments' end states (from zero) and
    # total decays exp(A * sum dt) forward; (batch, sub-segment, state, dim) and (batch,
    # sub-segment, dim)
    seg_off = tl.max_contiguous(pid_b * NSUB * NSTATE * DIM + n * DIM + d, [1, 1, 1, 1, 1])
    for j in range(0, 0 if PRE else seg * SUB):
        lam = tl.load(lseg_ptr + (pid_b * NSUB + j) * DIM + d + zero_kn, mask=mask_d, other=0.0)
        h = tl.exp2(A2 * lam) * h + tl.load(hseg_ptr + seg_off + j * NSTATE * DIM, mask=mask_dn,
                                            other=0.0)

    c_lo = seg * CPS
    c_hi = tl.minimum(c_lo + CPS, n_chunks)
    # (batch, channel, time) element at b SB + d SD + t ST; the wrapper hands over adjacent steps
    # (ST = 1: contiguous or channel-major storage); z may have its own strides
    row = pid_b * SB + d.to(tl.int64) * SD + zero_kn
    zrow = pid_b * ZB + d.to(tl.int64) * ZD + zero_kn
    tS = t_ * ST
    zero64 = pid_b * 0                       # chunk offsets in int64 (c * T * ST)
    TST = T * ST
    TZT = T * ZT
    ts_, own = _lane_steps(t_, kn_, T, LANE)   # per-(step, channel) values: their steps, lanes
    tSs = ts_ * ST
    tZs = ts_ * ZT
    LANE_D: tl.constexpr = LANE and HAS_D       # D u one step a lane: u at each lane's step,
    # taken from the u row (US_ROW: `_own_step`) or loaded one step a lane
    # B, C packed by the wrapper as (batch, chunk + 2, state block, T) fp32, zero padded
    # scalar pointers to the chunk's block plus the tile's int32 offsets within it
    bc_tile = n * T + t_ + (wd_ + ld_) * 0
    B_chunk = B_ptr + (pid_b * (n_chunks + 2) + c_lo) * BN * T
    C_chunk = C_ptr + (pid_b * (n_chunks + 2) + c_lo) * BN * T
    # checkpoints (batch, chunk, dim, state): a thread's NPT states of a channel are adjacent,
    # one 16-byte store a chunk in bf16 (NPT = 8), whole 32-byte sectors per program (the old
    # (state, dim) layout left bf16 half sectors at N = 64). fp32's 32 bytes a thread are over
    # the 16 that Triton lets one thread store, so it regroups the tile through shared memory
    # for the store (2 STS, LDS, BAR a chunk)
    ckpt_tile = d * NSTATE + n

    if PAIR:
        # The pipelined loop below (see there) with each iteration's two chunks (c, c + 1) a
        # pair whose per-(step, channel) rows -- delta, z, D u's u, the output -- are loaded
        # and stored together, state lane kn taking the S = 2T / KN adjacent steps kn * S ..
        # kn * S + S - 1 of the pair (the backward's chunk pairs): 4 bytes a lane in bf16 at
        # S = 2, half the L1 wavefronts of those accesses. A pair's step sizes are computed in
        # one go, an iteration ahead, and reach every lane chunk by chunk (`_from_lanes`); both
        # chunks' C h are reduce-scattered together into the pair layout (`_pair_sum`).
        # dt u reaches every lane the same way, from the pair's u loaded in the pair layout
        # (also D u's): no u row a chunk, whose 8 channels' rows a warp cost 8 L1 wavefronts a
        # chunk against 4 shuffles (the forward is bound by those wavefronts: NOTES.md).
        # G = 4 (QUADS): four chunks an iteration, S = 4T / KN steps a lane (8-byte accesses at
        # S = 4: half the wavefronts of the pairs' again), more registers held (the inference
        # forward has them).
        G: tl.constexpr = 4 if QUADS else 2
        S: tl.constexpr = G * T // KN
        ps_ = _pair_steps(kn_, T, KN, G)
        tPs = ps_ * ST
        tZp = ps_ * ZT
        lo = c_lo * T
        lim = tl.minimum(L, c_hi * T)
        # the first group: c_lo - 1 .. c_lo + G - 2, chunk c_lo - 1 the warm-up no-op
        pc = row + (zero64 + c_lo - 1) * TST + tPs
        st = (c_lo - 1) * T + ps_
        m_p = (st >= lo) & (st < lim) & mask_row
        dtp = _fwd_step_sizes(tl.load(delta_ptr + pc, mask=m_p, other=0.0), bias, m_p, HAS_BIAS,
                              SOFTPLUS, FAST_LOG)
        lam_p = dtp          # PRE: the summed step sizes (each group's, once)
        if HAS_Z:
            z_cur = tl.load(z_ptr + zrow + (zero64 + c_lo - 1) * TZT + tZp, mask=m_p, other=0.0)
        us_cur = tl.load(u_ptr + pc, mask=m_p, other=0.0)
        dtup = dtp * us_cur.to(tl.float32)
        dl_nx = tl.load(delta_ptr + pc + G * TST, mask=(st + G * T < lim) & mask_row, other=0.0)
        B_cur = tl.zeros_like(bc_tile).to(tl.float32)
        C_cur = B_cur
        dtu_cur = tl.zeros_like(row + tS).to(tl.float32)
        dA_cur = B_cur + 1.0
        for c in range(c_lo - 1, c_hi, G):
            pc = row + (zero64 + c) * TST + tPs
            st = c * T + ps_
            m_nx = (st + G * T < lim) & mask_row          # the next group's steps (c + G > c_lo)
            if HAS_Z:
                z_nx = tl.load(z_ptr + zrow + (zero64 + c + G) * TZT + tZp, mask=m_nx, other=0.0)
            us_nx = tl.load(u_ptr + pc + G * TST, mask=m_nx, other=0.0)
            dl_nn = tl.load(delta_ptr + pc + 2 * G * TST, mask=(st + 2 * G * T < lim) & mask_row,
                            other=0.0)
            for half in tl.static_range(G):
                cc = c + half
                if G == 2:  # (the packed B, C have two chunks of padding)
                    B_nx = tl.load(B_chunk + bc_tile).to(tl.float32)
                    if PRE:
                        C_nx = C_cur
                    else:
                        C_nx = tl.load(C_chunk + bc_tile).to(tl.float32)
                else:  # chunks past those: no-ops, any finite B, C
                    B_nx = tl.load(B_chunk + bc_tile, mask=zero_kn + cc + 1 < n_chunks + 2,
                                   other=0.0).to(tl.float32)
                    if PRE:
                        C_nx = C_cur
                    else:
                        C_nx = tl.load(C_chunk + bc_tile, mask=zero_kn + cc + 1 < n_chunks + 2,
                                       other=0.0).to(tl.float32)
                B_chunk += BN * T
                C_chunk += BN * T
                # chunk cc + 1's step sizes: the group's next chunk, then the next group's first
                if half == G - 1:
                    dtp = _fwd_step_sizes(dl_nx, bias, m_nx, HAS_BIAS, SOFTPLUS, FAST_LOG)
                    dtup = dtp * us_nx.to(tl.float32)
                    if PRE:
                        lam_p += dtp
                dt_nx = _from_lanes(dtp, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, S, (half + 1) % G)
                dtu_nx = _from_lanes(dtup, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, S, (half + 1) % G)
                dA_nx = tl.exp2(dt_nx * A2)

                # chunk cc's recurrence and checkpoint (as in the loop below)
                in_seg = (zero_kn + cc >= c_lo) & (zero_kn + cc < c_hi)
                if STORE_CKPT:
                    tl.store(ckpt_ptr + (pid_b * n_chunks + cc) * DIM * NSTATE + ckpt_tile,
                             h.to(ckpt_ptr.dtype.element_ty), mask=mask_dn & in_seg)
                h, H = _fwd_states(h, dA_cur, dtu_cur * B_cur, t_, T)
                if not PRE:
                    y_p = tl.reduce(H * C_cur, AX_NPT, _add, keep_dims=True)
                    if half == 0:
                        y_a = y_p
                    if half == 1:
                        y_b = y_p
                    if half == 2:
                        y_c = y_p
                B_cur, C_cur, dtu_cur, dA_cur = B_nx, C_nx, dtu_nx, dA_nx
            # the group's outputs
            if not PRE:
                if G == 2:
                    y = _pair_sum(y_a, y_p, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
                else:
                    y = _quad_sum(y_a, y_b, y_c, y_p, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN,
                                  AX_LD)
                if HAS_D:
                    y = y + Dv * us_cur.to(tl.float32)
                if HAS_Z:  # y z sigmoid(z); zz * -LOG2E: a negation would cost an FADD
                    zz = z_cur.to(tl.float32)
                    y = y * zz * _rcp(1.0 + tl.exp2(zz * -LOG2E), FAST_LOG)
                tl.store(out_ptr + pc, y.to(out_ptr.dtype.element_ty),
                         mask=(st >= lo) & (st < lim) & mask_row)
            dl_nx = dl_nn
            if HAS_Z:
                z_cur = z_nx
            us_cur = us_nx
        if PRE:
            _store_piece(hseg_ptr, lseg_ptr, pid_b * NSUB + seg, h, lam_p, n, d, kn_, mask_dn,
                         mask_row, NSTATE, DIM, True, AX_KN)
    elif PIPELINE:
        # Software pipeline: while chunk cc's recurrence runs, chunk cc + 1's step sizes and
        # decays (softplus, exp2: independent of the state) are computed, chunk cc + 1's u, z,
        # B, C rows and chunk cc + 2's delta row are loaded. Two chunks per iteration
        # (tl.static_range(2)) so that every value carried to the next chunk is defined in one
        # half and dead in the other: no register copies at the loop's back edge (the
        # one-chunk prefetch below cost ~60 MOVs per chunk). The loop starts one chunk early, at
        # a warm-up chunk c_lo - 1 with decay 1, no input and no stores, which computes chunk
        # c_lo's decays; a chunk past c_hi (odd count) is the same no-op.
        os_ = row + (zero64 + c_lo) * TST + tSs
        dl_nx = tl.load(delta_ptr + os_, mask=(c_lo * T + ts_ < L) & mask_row & own, other=0.0)
        u_cur = tl.zeros_like(row + tS).to(u_ptr.dtype.element_ty)
        if LANE_D:
            if not US_ROW:
                us_cur = tl.zeros_like(os_).to(u_ptr.dtype.element_ty)
        if HAS_Z:
            z_cur = tl.zeros_like(os_).to(z_ptr.dtype.element_ty)
        B_cur = tl.zeros_like(bc_tile).to(tl.float32)
        C_cur = B_cur
        dt_cur = tl.zeros_like(u_cur).to(tl.float32)
        dA_cur = B_cur + 1.0
        for c in range(c_lo - 1, c_hi, 2):
            for half in tl.static_range(2):
                cc = c + half
                t = cc * T + t_
                ts = cc * T + ts_
                o = row + (zero64 + cc) * TST + tS
                os_ = row + (zero64 + cc) * TST + tSs
                m_nx = (t + T < L) & mask_row
                ms_nx = (ts + T < L) & mask_row & own
                u_nx = tl.load(u_ptr + o + TST, mask=m_nx, other=0.0)
                if LANE_D:
                    if not US_ROW:
                        us_nx = tl.load(u_ptr + os_ + TST, mask=ms_nx, other=0.0)
                if HAS_Z:
                    z_nx = tl.load(z_ptr + zrow + (zero64 + cc + 1) * TZT + tZs, mask=ms_nx, other=0.0)
                dl_nn = tl.load(delta_ptr + os_ + 2 * TST, mask=(ts + 2 * T < L) & mask_row & own,
                                other=0.0)
                # packed B, C: two padding chunks past the end cover the odd no-op chunk's
                # (a loop-carried scalar pointer: ptxas then folds the tile's offsets into
                # the loads' immediates; a clamped chunk index cost an IMAD.WIDE per load)
                B_nx = tl.load(B_chunk + bc_tile).to(tl.float32)
                C_nx = tl.load(C_chunk + bc_tile).to(tl.float32)
                B_chunk += BN * T
                C_chunk += BN * T

                # chunk cc + 1's step sizes and decays (0 and 1 past the segment or the end)
                dt_nx = dl_nx.to(tl.float32)
                if HAS_BIAS:
                    dt_nx += bias
                if SOFTPLUS:  # torch's softplus: x itself above 20
                    dt_nx = tl.where(dt_nx > 20.0, dt_nx,
                                     _log2(1.0 + tl.exp2(dt_nx * LOG2E), FAST_LOG) * 0.6931471805599453)
                dt_nx = tl.where(ms_nx & (zero_kn + cc + 1 < c_hi), dt_nx, 0.0)
                if LANE:
                    dt_nx = _from_lanes(dt_nx, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
                dA_nx = tl.exp2(dt_nx * A2)

                # chunk cc's recurrence, output and checkpoint
                in_seg = (zero_kn + cc >= c_lo) & (zero_kn + cc < c_hi)
                if STORE_CKPT:  # the state entering chunk cc, for the backward
                    tl.store(ckpt_ptr + (pid_b * n_chunks + cc) * DIM * NSTATE + ckpt_tile,
                             h.to(ckpt_ptr.dtype.element_ty), mask=mask_dn & in_seg)  # fp32 or bf16
                u = u_cur.to(tl.float32)
                h, H = _fwd_states(h, dA_cur, (dt_cur * u) * B_cur, t_, T)
                y = _state_sum(H * C_cur, t_, ts_, LANE, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
                if HAS_D:
                    if LANE:
                        if US_ROW:
                            y = y + Dv * _own_step(u, t_, ts_, T)
                        else:
                            y = y + Dv * us_cur.to(tl.float32)
                    else:
                        y = y + Dv * u
                if HAS_Z:  # y z sigmoid(z); zz * -LOG2E: a negation would cost an FADD
                    zz = z_cur.to(tl.float32)
                    y = y * zz * _rcp(1.0 + tl.exp2(zz * -LOG2E), FAST_LOG)
                tl.store(out_ptr + os_, y.to(out_ptr.dtype.element_ty),
                         mask=(ts < L) & mask_row & own & in_seg)

                u_cur, B_cur, C_cur, dt_cur, dA_cur, dl_nx = u_nx, B_nx, C_nx, dt_nx, dA_nx, dl_nn
                if LANE_D:
                    if not US_ROW:
                        us_cur = us_nx
                if HAS_Z:
                    z_cur = z_nx
    else:
        # the rows of chunk c + 1, B and C included, are loaded while chunk c computes (B and C's
        # cache latency was a third of the stalls without their prefetch)
        t = c_lo * T + t_
        m_nx = (t < L) & mask_row
        ms_nx = (c_lo * T + ts_ < L) & mask_row & own
        o = row + (zero64 + c_lo) * TST + tS
        os_ = row + (zero64 + c_lo) * TST + tSs
        u_nx = tl.load(u_ptr + o, mask=m_nx, other=0.0)
        if LANE_D:
            if not US_ROW:
                us_nx = tl.load(u_ptr + os_, mask=ms_nx, other=0.0)
        dl_nx = tl.load(delta_ptr + os_, mask=ms_nx, other=0.0)
        if HAS_Z:
            z_nx = tl.load(z_ptr + zrow + (zero64 + c_lo) * TZT + tZs, mask=ms_nx, other=0.0)
        ckpt_ptrs = ckpt_ptr + (pid_b * n_chunks + c_lo) * DIM * NSTATE + ckpt_tile
        B_nx = tl.load(B_chunk + bc_tile).to(tl.float32)
        C_nx = tl.load(C_chunk + bc_tile).to(tl.float32)
        for c in range(c_lo, c_hi):
            t = c * T + t_
            ts = c * T + ts_
            m_s = (ts < L) & mask_row & own
            u = u_nx.to(tl.float32)
            if LANE_D:
                if US_ROW:
                    us = _own_step(u, t_, ts_, T)
                else:
                    us = us_nx.to(tl.float32)
            else:
                us = u
            dt = dl_nx.to(tl.float32)
            if HAS_Z:
                zz = z_nx.to(tl.float32)
            m_nx = (t + T < L) & mask_row
            ms_nx = (ts + T < L) & mask_row & own
            o = row + (zero64 + c) * TST + tS              # chunk c; c + 1 is prefetched
            os_ = row + (zero64 + c) * TST + tSs
            u_nx = tl.load(u_ptr + o + TST, mask=m_nx, other=0.0)
            if LANE_D:
                if not US_ROW:
                    us_nx = tl.load(u_ptr + os_ + TST, mask=ms_nx, other=0.0)
            dl_nx = tl.load(delta_ptr + os_ + TST, mask=ms_nx, other=0.0)
            if HAS_Z:
                z_nx = tl.load(z_ptr + zrow + (zero64 + c + 1) * TZT + tZs, mask=ms_nx, other=0.0)
            Bt = B_nx   # the packed B, C hold padding chunks past the end: no mask needed
            Ct = C_nx
            B_nx = tl.load(B_chunk + BN * T + bc_tile).to(tl.float32)
            C_nx = tl.load(C_chunk + BN * T + bc_tile).to(tl.float32)
            B_chunk += BN * T
            C_chunk += BN * T
            if STORE_CKPT:  # the state entering chunk c, for the backward
                tl.store(ckpt_ptrs, h.to(ckpt_ptr.dtype.element_ty), mask=mask_dn)  # fp32 or bf16
                ckpt_ptrs += DIM * NSTATE
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:  # torch's softplus: x itself above 20
                dt = tl.where(dt > 20.0, dt, _log2(1.0 + tl.exp2(dt * LOG2E), FAST_LOG) * 0.6931471805599453)
            dt = tl.where(m_s, dt, 0.0)       # steps past the end: decay 1, no input
            if LANE:
                dt = _from_lanes(dt, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
            dA = tl.exp2(dt * A2)
            h, H = _fwd_states(h, dA, (dt * u) * Bt, t_, T)
            # y_t = C_t . h_t: the NPT states in-thread, then over the KN lanes
            y = _state_sum(H * Ct, t_, ts_, LANE, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
            if HAS_D:
                y = y + Dv * us
            if HAS_Z:
                y = y * zz * _rcp(1.0 + tl.exp2(zz * -LOG2E), FAST_LOG)
            tl.store(out_ptr + os_, y.to(out_ptr.dtype.element_ty), mask=m_s)

    if not PRE:
        tl.store(hlast_ptr + state_off, h, mask=mask_dn & (zero_kn + seg == NSEG - 1))


@triton.jit
def _scan_fwd_segment_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, hseg_ptr, lseg_ptr,
    L, DIM, NSTATE, n_chunks, CPS, NSEG, SB, SD, ST, ZB, ZD, ZT,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr,
    T: tl.constexpr, NPT: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr, LD: tl.constexpr,
    ASC: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr, AX_KN: tl.constexpr,
    AX_LD: tl.constexpr, LANE: tl.constexpr,
):
    """Program (batch row, channel block, sub-segment): the sub-segment's end state from a
    zero start and its summed step sizes, so that later segments can start without waiting.
    Launched for the sub-segments of every segment but the last (all CPS chunks long); NSEG:
    the number of sub-segments (hseg, lseg's second dim).
    LANE: as in `_scan_fwd_kernel`."""
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG0 = tl.full([1], -2147483648, tl.int32).to(tl.float32, bitcast=True)   # -0.0
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2)
    t_, np_, wd_, kn_, ld_ = _tile_index(T, NPT, WD, KN, LD, ASC)
    d = pid_d * (WD * LD) + wd_ * LD + ld_
    n = kn_ * NPT + np_
    BN: tl.constexpr = NPT * KN
    mask_d = d < DIM
    mask_dn = mask_d & (n < NSTATE)
    zero_kn = kn_ * 0
    mask_row = mask_d & (zero_kn == 0)
    A2 = tl.load(A_ptr + d * NSTATE + n, mask=mask_dn, other=0.0) * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d + zero_kn, mask=mask_d, other=0.0)
    # (batch, channel, time) element at b SB + d SD + t ST (z is not read here)
    row = pid_b * SB + d.to(tl.int64) * SD + zero_kn
    tS = t_ * ST
    zero64 = pid_b * 0                       # chunk offsets in int64 (c * T * ST)
    TST = T * ST
    c_lo = seg * CPS
    c_hi = c_lo + CPS                       # segments before the last are full
    # pipelined like _scan_fwd_kernel's loop: chunk cc + 1's step sizes and decays and the
    # next rows' loads overlap chunk cc's recurrence; two chunks per iteration, a no-op
    # warm-up chunk c_lo - 1 and a no-op chunk c_hi when the count is odd
    bc_tile = n * T + t_ + (wd_ + ld_) * 0
    B_chunk = B_ptr + (pid_b * (n_chunks + 2) + c_lo) * BN * T
    ts_, own = _lane_steps(t_, kn_, T, LANE)   # the step sizes' softplus: see _scan_fwd_kernel
    tSs = ts_ * ST
    os_ = row + (zero64 + c_lo) * TST + tSs
    dl_nx = tl.load(delta_ptr + os_, mask=(c_lo * T + ts_ < L) & mask_row & own, other=0.0)
    u_cur = tl.zeros_like(row + tS).to(u_ptr.dtype.element_ty)
    B_cur = tl.zeros_like(bc_tile).to(tl.float32)
    dt_cur = tl.zeros_like(u_cur).to(tl.float32)
    dA_cur = B_cur + 1.0
    h = tl.zeros_like(A2)
    lam = tl.zeros_like(os_).to(tl.float32)
    for c in range(c_lo - 1, c_hi, 2):
        for half in tl.static_range(2):
            cc = c + half
            t = cc * T + t_
            o = row + (zero64 + cc) * TST + tS
            m_nx = (t + T < L) & mask_row & (zero_kn + cc + 1 < c_hi)
            ts = cc * T + ts_
            u_nx = tl.load(u_ptr + o + TST, mask=m_nx, other=0.0)
            dl_nn = tl.load(delta_ptr + row + (zero64 + cc) * TST + tSs + 2 * TST,
                            mask=(ts + 2 * T < L) & mask_row & own, other=0.0)
            B_nx = tl.load(B_chunk + bc_tile).to(tl.float32)
            B_chunk += BN * T
            dt_nx = dl_nx.to(tl.float32)
            if HAS_BIAS:
                dt_nx += bias
            if SOFTPLUS:
                dt_nx = tl.where(dt_nx > 20.0, dt_nx,
                                 _log2(1.0 + tl.exp2(dt_nx * LOG2E), FAST_LOG) * 0.6931471805599453)
            dt_nx = tl.where((ts + T < L) & mask_row & own & (zero_kn + cc + 1 < c_hi), dt_nx, 0.0)
            lam += dt_nx
            if LANE:
                dt_nx = _from_lanes(dt_nx, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
            dA_nx = tl.exp2(dt_nx * A2)
            dBu = (dt_cur * u_cur.to(tl.float32)) * B_cur
            for k in tl.static_range(T):
                at_k = t_ == k
                h = (tl.reduce(tl.where(at_k, dA_cur, NEG0), 0, _add, keep_dims=True) * h
                     + tl.reduce(tl.where(at_k, dBu, NEG0), 0, _add, keep_dims=True))
            u_cur, B_cur, dt_cur, dA_cur, dl_nx = u_nx, B_nx, dt_nx, dA_nx, dl_nn
    _store_piece(hseg_ptr, lseg_ptr, pid_b * NSEG + seg, h, lam, n, d, kn_, mask_dn, mask_row,
                 NSTATE, DIM, LANE, AX_KN)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_step_inputs(draw, dout, zz, bias, m, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr):
    """The backward's per-(step, channel) inputs: step sizes dts (0 where not m), the softplus
    derivative dsp, sigmoid(z) and dy = dout z sigmoid(z) (dsp, sig: dummies without them)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    if HAS_BIAS:
        draw += bias
    dt = draw
    dsp = draw
    if SOFTPLUS:
        # softplus and its derivative sigmoid(draw) = e / (1 + e) from one e = exp(draw)
        # (above 20 softplus is the identity, its derivative 1)
        e_draw = tl.exp2(draw * LOG2E)
        dt = tl.where(draw > 20.0, draw, _log2(1.0 + e_draw, FAST_LOG) * 0.6931471805599453)
        dsp = tl.where(draw > 20.0, 1.0, e_draw * _rcp(1.0 + e_draw, FAST_LOG))
    dts = tl.where(m, dt, 0.0)
    sig = dout
    dys = dout
    if HAS_Z:
        sig = _rcp(1.0 + tl.exp2(zz * -LOG2E), FAST_LOG)
        dys = dout * zz * sig
    return dts, dsp, sig, dys


@triton.jit
def _bwd_states(dtu, h, Bt, dt, A2, t_, T: tl.constexpr):
    """A chunk's states recomputed from its checkpoint h (on the time axis): returns them (H)
    and the decays and dt B u they came from. dt (0 on steps past the end): the chunk's step
    sizes, dtu: dt u, all T steps in every lane."""
    NEG0 = tl.full([1], -2147483648, tl.int32).to(tl.float32, bitcast=True)   # -0.0
    dA = tl.exp2(dt * A2)
    dBu = dtu * Bt
    H = tl.zeros_like(dBu)
    for k in tl.static_range(T):
        at_k = t_ == k
        # NEG0 for the decays (exp2 results: with +0.0 each extraction costs an FADD); the
        # products dBu and x take Triton's +0.0 for a literal -0.0, which ptxas folds into
        # the FFMA that makes them, and which compiles to fewer registers under the cap
        h = (tl.reduce(tl.where(at_k, dA, NEG0), 0, _add, keep_dims=True) * h
             + tl.reduce(tl.where(at_k, dBu, -0.0), 0, _add, keep_dims=True))
        H = tl.where(at_k, h, H)
    return H, dA, dBu


@triton.jit
def _bwd_walk(H, dA, dBu, dtu, Bt, Ct, dt, dy, g, A, dA_acc, dB_ptr, dC_ptr, red_base, red_tile,
              ld_q, t_, WANT_Y: tl.constexpr, RS: tl.constexpr, RS_ROUNDS: tl.constexpr, LOG_LD: tl.constexpr,
              T: tl.constexpr, NPT: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr,
              LD: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr, AX_KN: tl.constexpr,
              AX_LD: tl.constexpr):
    """A chunk walked back from g (the gradient reaching its end state), on the time axis:
    dA's share, and dB, dC summed over the program's channels into their packed buffers (at
    red_base + red_tile). H, dA, dBu, dtu: `_bwd_states`; dy: the chunk's output gradients.
    Returns g at the chunk's start, dA_acc, and per step, summed over the thread's states,
    dh B (for du), q A (for ddelta) and, WANT_Y, C h (for dz; else a dummy: here, between
    them, the chunk pairs' backward compiles without spills under the 168 cap)."""
    NEG0 = tl.full([1], -2147483648, tl.int32).to(tl.float32, bitcast=True)   # -0.0
    # walk the chunk backwards: dh_t = C_t dy_t + exp(dt_{t+1} A) dh_{t+1}; g carries the
    # second term, and after step 0 it is the gradient of the chunk's starting state
    x = Ct * dy
    DH = tl.zeros_like(x)
    for k in tl.static_range(T - 1, -1, -1):
        at_k = t_ == k
        dh = g + tl.reduce(tl.where(at_k, x, -0.0), 0, _add, keep_dims=True)
        DH = tl.where(at_k, dh, DH)
        g = tl.reduce(tl.where(at_k, dA, NEG0), 0, _add, keep_dims=True) * dh

    # q = dh * exp(dt A) h_{t-1} = dh (h_t - dt u B): the gradient of the exponent dt * A
    q = DH * (H - dBu)
    dhB_p = tl.reduce(DH * Bt, AX_NPT, _add, keep_dims=True)
    qA_p = tl.reduce(q * A, AX_NPT, _add, keep_dims=True)
    y_p = g
    if WANT_Y:
        y_p = tl.reduce(H * Ct, AX_NPT, _add, keep_dims=True)
    dA_acc += tl.reduce(q * dt, 0, _add, keep_dims=True)
    if RS:
        # dB, dC summed over the LD channel lanes by a reduce-scatter: each round a lane
        # keeps one half of its values, sends the other half to the partner lane (lane xor m)
        # and adds what the partner sent; after log2(LD) rounds each lane holds the channel
        # sums of T * NPT / LD (state, step) pairs (1 shuffle per pair and round instead of
        # log2(LD) shuffles for every value), and the atomics are not replicated over lanes.
        # Fewer rounds (RS_ROUNDS) trade shuffles for atomics: 2 ** (LOG_LD - RS_ROUNDS)
        # lanes add partial sums of each value
        V: tl.constexpr = T * NPT
        for kk in tl.static_range(2):
            if kk == 0:
                P = DH * dtu
            else:
                P = H * dy
            # (KN, LD, V): v = npt * T + t in-thread
            Q = tl.reshape(tl.permute(P, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (KN, LD, V))
            for lvl in tl.static_range(RS_ROUNDS):
                # Q.shape[2] values per lane before this round; its lane bit (Q.shape[2] * LD
                # // (2 V)) is LD / 2, LD / 4, ..., 1 (inline: names assigned in a static_range
                # body stop being constexprs). a: v's top bit 0, b: top bit 1; lanes with the
                # bit set keep b, so after RS_ROUNDS rounds v = (ld >> (LOG_LD - RS_ROUNDS)) * W + w
                a, b = tl.split(tl.permute(tl.reshape(Q, (KN, LD, 2, Q.shape[2] // 2)), (0, 1, 3, 2)))
                up = (ld_q & (Q.shape[2] * LD // (2 * V))) != 0
                send = tl.where(up, a, b)
                keep = tl.where(up, b, a)
                Q = keep + tl.gather(send, (ld_q ^ (Q.shape[2] * LD // (2 * V)))
                                     + tl.zeros((KN, LD, Q.shape[2] // 2), tl.int32), 1)
            if kk == 0:
                tl.atomic_add(dB_ptr + red_base + red_tile, Q, sem="relaxed")
            else:
                tl.atomic_add(dC_ptr + red_base + red_tile, Q, sem="relaxed")
    else:
        # dB, dC: reduce over this program's channels (lanes, then warps), then one atomic
        # each into the packed (batch, chunk, state block, T) fp32 buffers
        dB_c = tl.reduce(tl.reduce(DH * dtu, AX_LD, _add, keep_dims=True), AX_WD, _add,
                         keep_dims=True)
        dC_c = tl.reduce(tl.reduce(H * dy, AX_LD, _add, keep_dims=True), AX_WD, _add,
                         keep_dims=True)
        tl.atomic_add(dB_ptr + red_base + red_tile, dB_c, sem="relaxed")
        tl.atomic_add(dC_ptr + red_base + red_tile, dC_c, sem="relaxed")
    return g, dA_acc, dhB_p, qA_p, y_p


@triton.jit
def _bwd_store_dz(y, us, Dv, dout, zz, sig, m, off, dz_ptr, HAS_D: tl.constexpr):
    """dz = dout y' sigmoid(z) (1 + z (1 - sigmoid(z))) stored at off where m; y' = y + D u."""
    if HAS_D:
        y = y + Dv * us
    dz = dout * y * sig * (1.0 + zz * (1.0 - sig))
    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_step_outputs(s_dhB, s_qA, dts, dys, dsp, us, Dv, m, off, du_ptr, ddelta_ptr, dD_acc,
                      dbias_acc, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SOFTPLUS: tl.constexpr):
    """The backward's per-(step, channel) outputs from the state sums s_dhB, s_qA: du, ddelta
    stored at off where m; dD's and ddelta_bias's sums accumulated."""
    if HAS_D:
        dD_acc += dys * us
    du = dts * s_dhB
    if HAS_D:
        du += Dv * dys
    tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=m)
    ddt = s_qA + us * s_dhB
    if SOFTPLUS:
        ddt = ddt * dsp
    ddt = tl.where(m, ddt, 0.0)
    tl.store(ddelta_ptr + off, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
    if HAS_BIAS:
        dbias_acc += ddt
    return dD_acc, dbias_acc


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
    gseg_ptr, lseg_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
    L, DIM, NSTATE, n_chunks, CPS, SUB, NSUB, SB, SD, ST, ZB, ZD, ZT, OB, OD, OT,
    O_LIKE_U: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, STORE_DH0: tl.constexpr, FAST_LOG: tl.constexpr,
    T: tl.constexpr, NPT: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr, LD: tl.constexpr,
    ASC: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr, AX_KN: tl.constexpr,
    AX_LD: tl.constexpr, RS: tl.constexpr, LOG_LD: tl.constexpr, RS_ROUNDS: tl.constexpr,
    LANE: tl.constexpr, US_ROW: tl.constexpr, PAIR: tl.constexpr, BC_PF: tl.constexpr,
):
    """Program (batch row, channel block, segment): the segment's chunks, last to first.
    The pre-pass cut the sequence into NSUB sub-segments, SUB a segment (as the forward's).
    RS (WD == 1 and 2 <= LD <= T * NPT only): dB, dC summed over channels by a lane reduce-scatter
    of RS_ROUNDS <= LOG_LD rounds; the 2 ** (LOG_LD - RS_ROUNDS) lanes then holding partial sums
    of the same (state, step) values add them by atomics.
    LANE (KN % T == 0 only): the per-(step, channel) work -- softplus, gate, the outputs -- done
    once, state lane kn taking step kn of the chunk, instead of by every state lane for every
    step; the step sizes and dy reach the other lanes by one shuffle a value and step.
    PAIR (LANE, KN = T or 2T): two chunks an iteration, their per-(step, channel) rows loaded and
    stored together (see below). dout is read with its own strides (OB, OD, OT).
    BC_PF > 0: B and C of the chunk BC_PF chunks (pairs: pairs) ahead are prefetched into L1
    each iteration (B, C are loaded in the chunk that uses them)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2)
    t_, np_, wd_, kn_, ld_ = _tile_index(T, NPT, WD, KN, LD, ASC)
    d = pid_d * (WD * LD) + wd_ * LD + ld_
    n = kn_ * NPT + np_
    BN: tl.constexpr = NPT * KN
    mask_d = d < DIM
    mask_dn = mask_d & (n < NSTATE)
    zero_kn = kn_ * 0
    mask_row = mask_d & (zero_kn == 0)

    A = tl.load(A_ptr + d * NSTATE + n, mask=mask_dn, other=0.0)
    A2 = A * LOG2E
    bias = 0.0          # (unused without delta_bias / D)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d + zero_kn, mask=mask_d, other=0.0)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + d + zero_kn, mask=mask_d, other=0.0)
    state_off = (pid_b * DIM + d) * NSTATE + n
    # g: gradient reaching the state at the end of the chunk in hand, from the steps after it;
    # later segments' contributions come from their zero-start sums and total decays
    if HAS_DLAST:
        g = tl.load(dlast_ptr + state_off, mask=mask_dn, other=0.0)
    else:
        g = tl.zeros_like(A)
    seg_off = tl.max_contiguous(pid_b * NSUB * NSTATE * DIM + n * DIM + d, [1, 1, 1, 1, 1])
    for jj in range(0, NSUB - (seg + 1) * SUB):
        j = NSUB - 1 - jj
        lam = tl.load(lseg_ptr + (pid_b * NSUB + j) * DIM + d + zero_kn, mask=mask_d, other=0.0)
        g = tl.exp2(A2 * lam) * g + tl.load(gseg_ptr + seg_off + j * NSTATE * DIM, mask=mask_dn,
                                            other=0.0)

    c_lo = seg * CPS
    c_hi = tl.minimum(c_lo + CPS, n_chunks)
    # (batch, channel, time) element at b SB + d SD + t ST; the wrapper hands over adjacent steps
    # (ST = 1: contiguous or channel-major storage); z may have its own strides
    row = pid_b * SB + d.to(tl.int64) * SD + zero_kn
    zrow = pid_b * ZB + d.to(tl.int64) * ZD + zero_kn
    orow = pid_b * OB + d.to(tl.int64) * OD + zero_kn   # dout's own strides (unless O_LIKE_U)
    tS = t_ * ST
    zero64 = pid_b * 0                       # chunk offsets in int64 (c * T * ST)
    TST = T * ST
    TZT = T * ZT
    TOT = T * OT
    # B, C packed (batch, chunk + 2, state block, T): a scalar pointer to the chunk's block
    # (moved back one chunk per iteration) plus the tile's int32 offsets within it
    bc_tile = n * T + t_ + (wd_ + ld_) * 0
    if RS:  # dB, dC's offsets within a chunk's block: the reduce-scatter's (KN, LD, values) layout
        V: tl.constexpr = T * NPT
        ld_q = tl.arange(0, LD)[None, :, None]
        # the (state, step) values a lane holds at the end: v = (ld >> (LOG_LD - RS_ROUNDS)) * W
        # + w of its KN row, W = V >> RS_ROUNDS (the rounds split on ld's bits, highest first)
        W: tl.constexpr = V >> RS_ROUNDS
        red_tile = (tl.arange(0, KN)[:, None, None] * V + (ld_q >> (LOG_LD - RS_ROUNDS)) * W
                    + tl.arange(0, W)[None, None, :])
    else:
        ld_q = ld_
        red_tile = n * T + t_
    dA_acc = tl.zeros_like(A)

    if PAIR:
        # Chunk pairs (KN = T or 2T; LANE): the per-(step, channel) rows of two chunks are
        # loaded and stored together, state lane kn taking the S = 2T / KN adjacent steps kn * S
        # .. kn * S + S - 1 of the pair: 4 bytes a lane in bf16 at S = 2, half the wavefronts of
        # one step a lane a chunk (8 channels' rows a warp either way). The pair's step sizes
        # and dy reach every lane chunk by chunk (`_from_lanes`); the state sums of both chunks
        # are reduce-scattered together into the pair layout (`_pair_sum`). The pairs start at
        # the segment's end; with an odd chunk count the first pair's later chunk is c_hi, a
        # no-op (no steps: decay 1, no input, zero dB and dC added to the padding or to the
        # next segment's chunk).
        S: tl.constexpr = 2 * T // KN
        ps_ = _pair_steps(kn_, T, KN, 2)
        tPs = ps_ * ST
        tZp = ps_ * ZT
        tOp = ps_ * OT
        lim = tl.minimum(L, c_hi * T)
        n_pairs = (c_hi - c_lo + 1) // 2
        c_top = c_lo + 2 * n_pairs
        dD_acc = tl.zeros_like(ps_ + d + zero_kn).to(tl.float32)   # (step, channel) accumulators
        dbias_acc = tl.zeros_like(dD_acc)
        # the pair's rows one pair ahead, the checkpoint one chunk ahead (no u row: dt u
        # reaches every lane like dt and dy, from the pair's u)
        op = row + (zero64 + c_top - 2) * TST + tPs
        mp = ((c_top - 2) * T + ps_ < lim) & mask_row
        dl_nx = tl.load(delta_ptr + op, mask=mp, other=0.0)
        if O_LIKE_U:
            do_nx = tl.load(dout_ptr + op, mask=mp, other=0.0)
        else:
            do_nx = tl.load(dout_ptr + orow + (zero64 + c_top - 2) * TOT + tOp, mask=mp, other=0.0)
        us_nx = tl.load(u_ptr + op, mask=mp, other=0.0)
        if HAS_Z:
            z_nx = tl.load(z_ptr + zrow + (zero64 + c_top - 2) * TZT + tZp, mask=mp, other=0.0)
        ckpt_ptrs = ckpt_ptr + (pid_b * n_chunks + c_top - 1) * DIM * NSTATE + d * NSTATE + n
        h_nx = tl.load(ckpt_ptrs, mask=mask_dn & (zero_kn + c_top - 1 < c_hi), other=0.0)
        B_chunk = B_ptr + (pid_b * (n_chunks + 2) + c_top - 1) * BN * T
        C_chunk = C_ptr + (pid_b * (n_chunks + 2) + c_top - 1) * BN * T
        bc_row = (pid_b * (n_chunks + 2)) * BN * T
        for pr in range(0, n_pairs):
            c0 = c_top - 2 - 2 * pr                      # the pair: chunks c0, c0 + 1
            c_pf = tl.maximum(c0 - 2 * BC_PF, 0)         # (B, C hold chunks 0 .. n_chunks + 1)
            _prefetch_l1(B_ptr + bc_row + c_pf * BN * T, 2 * BN * T, BC_PF > 0)
            _prefetch_l1(C_ptr + bc_row + c_pf * BN * T, 2 * BN * T, BC_PF > 0)
            m_p = (c0 * T + ps_ < lim) & mask_row
            draw = dl_nx.to(tl.float32)
            dout = do_nx.to(tl.float32)
            us = us_nx.to(tl.float32)
            if HAS_Z:
                zz = z_nx.to(tl.float32)
            else:
                zz = dout
            op = row + (zero64 + c0) * TST + tPs
            mp = (c0 * T + ps_ - 2 * T >= c_lo * T) & mask_row   # the pair before is in the segment
            dl_nx = tl.load(delta_ptr + op - 2 * TST, mask=mp, other=0.0)
            if O_LIKE_U:
                do_nx = tl.load(dout_ptr + op - 2 * TST, mask=mp, other=0.0)
            else:
                do_nx = tl.load(dout_ptr + orow + (zero64 + c0 - 2) * TOT + tOp, mask=mp, other=0.0)
            us_nx = tl.load(u_ptr + op - 2 * TST, mask=mp, other=0.0)
            if HAS_Z:
                z_nx = tl.load(z_ptr + zrow + (zero64 + c0 - 2) * TZT + tZp, mask=mp, other=0.0)
            dts, dsp, sig, dys = _bwd_step_inputs(draw, dout, zz, bias, m_p, HAS_Z, HAS_BIAS,
                                                  SOFTPLUS, FAST_LOG)
            dtus = dts * us
            for half in tl.static_range(2):
                cc = c0 + 1 - half                       # the later chunk first
                h = h_nx.to(tl.float32)
                ckpt_ptrs -= DIM * NSTATE
                h_nx = tl.load(ckpt_ptrs, mask=mask_dn & (zero_kn + cc > c_lo), other=0.0)
                Bt = tl.load(B_chunk + bc_tile).to(tl.float32)
                Ct = tl.load(C_chunk + bc_tile).to(tl.float32)
                B_chunk -= BN * T
                C_chunk -= BN * T
                dt = _from_lanes(dts, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, S, 1 - half)
                dy = _from_lanes(dys, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, S, 1 - half)
                dtu = _from_lanes(dtus, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, S, 1 - half)
                H, dA, dBu = _bwd_states(dtu, h, Bt, dt, A2, t_, T)
                # y_p: C h summed over the thread's states, for dz
                g, dA_acc, dhB_p, qA_p, y_p = _bwd_walk(
                    H, dA, dBu, dtu, Bt, Ct, dt, dy, g, A, dA_acc, dB_ptr, dC_ptr,
                    (pid_b * (n_chunks + 2) + cc) * BN * T, red_tile, ld_q, t_, HAS_Z, RS,
                    RS_ROUNDS, LOG_LD, T, NPT, WD, KN, LD, AX_NPT, AX_WD, AX_KN, AX_LD)
                if half == 0:
                    y_b, dhB_b, qA_b = y_p, dhB_p, qA_p
            if HAS_Z:
                y = _pair_sum(y_p, y_b, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
            s_dhB = _pair_sum(dhB_p, dhB_b, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
            s_qA = _pair_sum(qA_p, qA_b, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
            if HAS_Z:
                _bwd_store_dz(y, us, Dv, dout, zz, sig, m_p, op, dz_ptr, HAS_D)
            dD_acc, dbias_acc = _bwd_step_outputs(
                s_dhB, s_qA, dts, dys, dsp, us, Dv, m_p, op, du_ptr, ddelta_ptr, dD_acc,
                dbias_acc, HAS_D, HAS_BIAS, SOFTPLUS)
    else:
        B_chunk = B_ptr + (pid_b * (n_chunks + 2) + c_hi - 1) * BN * T   # last chunk
        C_chunk = C_ptr + (pid_b * (n_chunks + 2) + c_hi - 1) * BN * T
        # checkpoints (batch, chunk, dim, state): NPT adjacent states a thread, wide loads
        ckpt_ptrs = ckpt_ptr + (pid_b * n_chunks + c_hi - 1) * DIM * NSTATE + d * NSTATE + n
        # per-(step, channel) values ("scalars": loads, softplus, gate, outputs) live either on
        # the whole time axis of every lane (t_) or, LANE, one step a state lane (ts_ = kn % T;
        # lanes kn >= T repeat lane kn - T and are masked off)
        ts_, own = _lane_steps(t_, kn_, T, LANE)
        tSs = ts_ * ST
        tZs = ts_ * ZT
        tOs = ts_ * OT
        dD_acc = tl.zeros_like(ts_ + d + zero_kn).to(tl.float32)     # (step, channel) accumulators
        dbias_acc = tl.zeros_like(dD_acc)
        # the u row (all T steps in every lane) only where u is not loaded one step a lane:
        # else dt u reaches every lane like dt (`_from_lanes`: 4 shuffles, not the row's 8 L1
        # wavefronts, 8 channels' rows a warp)
        U_ROW: tl.constexpr = (not LANE) or US_ROW

        # the chunk processed next (one earlier in time) is loaded while this one computes
        t = (c_hi - 1) * T + t_
        m_nx = (t < L) & mask_row
        ms_nx = ((c_hi - 1) * T + ts_ < L) & mask_row & own
        o = row + (zero64 + c_hi - 1) * TST + tS
        os_ = row + (zero64 + c_hi - 1) * TST + tSs
        if U_ROW:
            u_nx = tl.load(u_ptr + o, mask=m_nx, other=0.0)
        if LANE:
            if not US_ROW:
                us_nx = tl.load(u_ptr + os_, mask=ms_nx, other=0.0)
        dl_nx = tl.load(delta_ptr + os_, mask=ms_nx, other=0.0)
        if O_LIKE_U:
            do_nx = tl.load(dout_ptr + os_, mask=ms_nx, other=0.0)
        else:
            do_nx = tl.load(dout_ptr + orow + (zero64 + c_hi - 1) * TOT + tOs, mask=ms_nx, other=0.0)
        if HAS_Z:
            z_nx = tl.load(z_ptr + zrow + (zero64 + c_hi - 1) * TZT + tZs, mask=ms_nx, other=0.0)
        h_nx = tl.load(ckpt_ptrs, mask=mask_dn, other=0.0)
        bc_row = (pid_b * (n_chunks + 2)) * BN * T
        for cc in range(0, c_hi - c_lo):
            c = c_hi - 1 - cc
            t = c * T + t_
            ts = c * T + ts_
            m_s = (ts < L) & mask_row & own
            c_pf = tl.maximum(c - BC_PF, 0)
            _prefetch_l1(B_ptr + bc_row + c_pf * BN * T, BN * T, BC_PF > 0)
            _prefetch_l1(C_ptr + bc_row + c_pf * BN * T, BN * T, BC_PF > 0)
            if U_ROW:
                u = u_nx.to(tl.float32)
            if LANE:
                if US_ROW:
                    us = _own_step(u, t_, ts_, T)
                else:
                    us = us_nx.to(tl.float32)
            else:
                us = u
            draw = dl_nx.to(tl.float32)
            dout = do_nx.to(tl.float32)
            if HAS_Z:
                zz = z_nx.to(tl.float32)
            else:
                zz = dout
            h = h_nx.to(tl.float32)          # the checkpoint may be bf16; the recurrence runs in fp32
            m_nx = (t - T >= c_lo * T) & mask_row            # chunk c - 1 is in this segment
            ms_nx = (ts - T >= c_lo * T) & mask_row & own
            o = row + (zero64 + c) * TST + tS              # chunk c; c - 1 is prefetched
            os_ = row + (zero64 + c) * TST + tSs
            if U_ROW:
                u_nx = tl.load(u_ptr + o - TST, mask=m_nx, other=0.0)
            if LANE:
                if not US_ROW:
                    us_nx = tl.load(u_ptr + os_ - TST, mask=ms_nx, other=0.0)
            dl_nx = tl.load(delta_ptr + os_ - TST, mask=ms_nx, other=0.0)
            if O_LIKE_U:  # the offsets the other rows use (own expressions cost registers)
                do_nx = tl.load(dout_ptr + os_ - TST, mask=ms_nx, other=0.0)
            else:
                do_nx = tl.load(dout_ptr + orow + (zero64 + c - 1) * TOT + tOs, mask=ms_nx, other=0.0)
            if HAS_Z:
                z_nx = tl.load(z_ptr + zrow + (zero64 + c - 1) * TZT + tZs, mask=ms_nx, other=0.0)
            ckpt_ptrs -= DIM * NSTATE
            h_nx = tl.load(ckpt_ptrs, mask=mask_dn & (zero_kn + c > c_lo), other=0.0)

            Bt = tl.load(B_chunk + bc_tile).to(tl.float32)
            Ct = tl.load(C_chunk + bc_tile).to(tl.float32)
            B_chunk -= BN * T
            C_chunk -= BN * T
            dts, dsp, sig, dys = _bwd_step_inputs(draw, dout, zz, bias, m_s, HAS_Z, HAS_BIAS,
                                                  SOFTPLUS, FAST_LOG)
            if LANE:  # every lane gets the chunk's T step sizes and dy from the lanes that own them
                dt = _from_lanes(dts, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
                dy = _from_lanes(dys, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
            else:
                dt = dts
                dy = dys
            if U_ROW:
                dtu = dt * u
            else:
                dtu = _from_lanes(dts * us, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
            H, dA, dBu = _bwd_states(dtu, h, Bt, dt, A2, t_, T)
            if HAS_Z:
                y = _state_sum(H * Ct, t_, ts_, LANE, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
                _bwd_store_dz(y, us, Dv, dout, zz, sig, m_s, os_, dz_ptr, HAS_D)
            g, dA_acc, dhB_p, qA_p, _ = _bwd_walk(
                H, dA, dBu, dtu, Bt, Ct, dt, dy, g, A, dA_acc, dB_ptr, dC_ptr,
                (pid_b * (n_chunks + 2) + c) * BN * T, red_tile, ld_q, t_, False, RS, RS_ROUNDS,
                LOG_LD, T, NPT, WD, KN, LD, AX_NPT, AX_WD, AX_KN, AX_LD)
            s_dhB = _lanes_sum(dhB_p, t_, ts_, LANE, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
            s_qA = _lanes_sum(qA_p, t_, ts_, LANE, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD)
            dD_acc, dbias_acc = _bwd_step_outputs(
                s_dhB, s_qA, dts, dys, dsp, us, Dv, m_s, os_, du_ptr, ddelta_ptr, dD_acc,
                dbias_acc, HAS_D, HAS_BIAS, SOFTPLUS)

    # per-channel parameters: summed over time here, over batch rows and segments by atomics
    tl.atomic_add(dA_ptr + d * NSTATE + n + (wd_ + ld_) * 0, dA_acc, mask=mask_dn, sem="relaxed")
    first_kn = mask_row & (kn_ == 0)  # the KN lanes hold copies of each channel's sums
    if HAS_D:
        tl.atomic_add(dD_ptr + d + zero_kn, _step_sum(dD_acc, LANE, AX_KN), mask=first_kn,
                      sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d + zero_kn, _step_sum(dbias_acc, LANE, AX_KN), mask=first_kn,
                      sem="relaxed")
    if STORE_DH0:
        tl.store(dh0_ptr + state_off, g, mask=mask_dn & (zero_kn + seg == 0))


@triton.jit
def _bwd_segment_rows(delta_ptr, dout_ptr, z_ptr, row, orow, zrow, c, tS, tO, tZ, TST, TOT, TZT, m,
                      O_LIKE_U: tl.constexpr, HAS_Z: tl.constexpr):
    """The backward pre-pass's rows of chunk c (an int64) where m: delta, dout (at u's offsets
    when O_LIKE_U, else its own strides' row orow) and z (a dummy without z)."""
    o = row + c * TST + tS
    dl = tl.load(delta_ptr + o, mask=m, other=0.0)
    if O_LIKE_U:
        do = tl.load(dout_ptr + o, mask=m, other=0.0)
    else:
        do = tl.load(dout_ptr + orow + c * TOT + tO, mask=m, other=0.0)
    zz = dl
    if HAS_Z:
        zz = tl.load(z_ptr + zrow + c * TZT + tZ, mask=m, other=0.0)
    return dl, do, zz


@triton.jit
def _scan_bwd_segment_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, gseg_ptr, lseg_ptr,
    L, DIM, NSTATE, n_chunks, CPS, NSEG, SEG0, SB, SD, ST, ZB, ZD, ZT, OB, OD, OT,
    O_LIKE_U: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr,
    T: tl.constexpr, NPT: tl.constexpr, WD: tl.constexpr, KN: tl.constexpr, LD: tl.constexpr,
    ASC: tl.constexpr, AX_NPT: tl.constexpr, AX_WD: tl.constexpr, AX_KN: tl.constexpr,
    AX_LD: tl.constexpr, LANE: tl.constexpr, BC_PF: tl.constexpr,
):
    """Program (batch row, channel block, segment >= SEG0): the gradient its own outputs send to
    the state entering it (zero from later steps) and its summed step sizes. LANE, BC_PF: as in
    `_scan_bwd_kernel`."""
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG0 = tl.full([1], -2147483648, tl.int32).to(tl.float32, bitcast=True)   # -0.0
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2) + SEG0
    t_, np_, wd_, kn_, ld_ = _tile_index(T, NPT, WD, KN, LD, ASC)
    d = pid_d * (WD * LD) + wd_ * LD + ld_
    n = kn_ * NPT + np_
    BN: tl.constexpr = NPT * KN
    mask_d = d < DIM
    mask_dn = mask_d & (n < NSTATE)
    zero_kn = kn_ * 0
    mask_row = mask_d & (zero_kn == 0)
    A2 = tl.load(A_ptr + d * NSTATE + n, mask=mask_dn, other=0.0) * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d + zero_kn, mask=mask_d, other=0.0)
    # (batch, channel, time) element at b SB + d SD + t ST; the wrapper hands over adjacent steps
    # (ST = 1: contiguous or channel-major storage); z may have its own strides
    row = pid_b * SB + d.to(tl.int64) * SD + zero_kn
    zrow = pid_b * ZB + d.to(tl.int64) * ZD + zero_kn
    orow = pid_b * OB + d.to(tl.int64) * OD + zero_kn   # dout's own strides (unless O_LIKE_U)
    zero64 = pid_b * 0                       # chunk offsets in int64 (c * T * ST)
    TST = T * ST
    TZT = T * ZT
    TOT = T * OT
    c_lo = seg * CPS
    c_hi = tl.minimum(c_lo + CPS, n_chunks)
    bc_off = (pid_b * (n_chunks + 2) + c_hi - 1) * BN * T + n * T + t_ + (wd_ + ld_) * 0
    ts_, own = _lane_steps(t_, kn_, T, LANE)   # the per-(step, channel) work: see _scan_bwd_kernel
    tS = ts_ * ST
    tZ = ts_ * ZT
    tO = ts_ * OT
    g = tl.zeros_like(A2)
    lam = tl.zeros_like(ts_ + d + zero_kn).to(tl.float32)
    # chunk c - 1's rows and C are loaded while chunk c runs (each iteration used what it had
    # just loaded before: the loads' whole latency a chunk); segments >= SEG0 >= 1 start at
    # chunk >= 1, so chunk c_lo - 1's C (the last, unused prefetch) is inside the packed tensor
    dl_nx, do_nx, z_nx = _bwd_segment_rows(
        delta_ptr, dout_ptr, z_ptr, row, orow, zrow, zero64 + c_hi - 1, tS, tO, tZ, TST, TOT, TZT,
        ((c_hi - 1) * T + ts_ < L) & mask_row & own, O_LIKE_U, HAS_Z)
    C_nx = tl.load(C_ptr + bc_off)
    bc_row = (pid_b * (n_chunks + 2)) * BN * T
    for cc in range(0, c_hi - c_lo):
        c = c_hi - 1 - cc
        m_s = (c * T + ts_ < L) & mask_row & own
        dt = dl_nx.to(tl.float32)
        dy = do_nx.to(tl.float32)
        Ct = C_nx.to(tl.float32)
        if HAS_Z:
            zz = z_nx.to(tl.float32)
        dl_nx, do_nx, z_nx = _bwd_segment_rows(               # chunk c - 1 is in the segment
            delta_ptr, dout_ptr, z_ptr, row, orow, zrow, zero64 + c - 1, tS, tO, tZ, TST, TOT, TZT,
            ((c - 1) * T + ts_ >= c_lo * T) & mask_row & own, O_LIKE_U, HAS_Z)
        bc_off -= BN * T
        C_nx = tl.load(C_ptr + bc_off)
        _prefetch_l1(C_ptr + bc_row + tl.maximum(c - 1 - BC_PF, 0) * BN * T, BN * T, BC_PF > 0)
        if HAS_Z:
            dy = dy * zz * _rcp(1.0 + tl.exp2(zz * -LOG2E), FAST_LOG)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, _log2(1.0 + tl.exp2(dt * LOG2E), FAST_LOG) * 0.6931471805599453)
        dt = tl.where(m_s, dt, 0.0)
        lam += dt
        if LANE:
            dt = _from_lanes(dt, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
            dy = _from_lanes(dy, T, WD, KN, LD, ASC, AX_NPT, AX_WD, AX_KN, AX_LD, 1, 0)
        dA = tl.exp2(dt * A2)
        x = Ct * dy
        for k in tl.static_range(T - 1, -1, -1):
            at_k = t_ == k
            g = tl.reduce(tl.where(at_k, dA, NEG0), 0, _add, keep_dims=True) * (
                g + tl.reduce(tl.where(at_k, x, NEG0), 0, _add, keep_dims=True))
    _store_piece(gseg_ptr, lseg_ptr, pid_b * NSEG + seg, g, lam, n, d, kn_, mask_dn, mask_row,
                 NSTATE, DIM, LANE, AX_KN)


# --------------------------------------------------------------------------------------------
# one generation step
# --------------------------------------------------------------------------------------------
@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    DIM, NSTATE,
    s_sb, s_sd, s_sn, x_sb, x_sd, dt_sb, dt_sd, z_sb, z_sd, B_sb, B_sn, C_sb, C_sn, o_sb, o_sd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md = d < DIM
    mn = n < NSTATE
    mdn = md[:, None] & mn[None, :]
    s_ptrs = state_ptr + pid_b * s_sb + d[:, None] * s_sd + n[None, :] * s_sn
    h = tl.load(s_ptrs, mask=mdn, other=0.0)
    x = tl.load(x_ptr + pid_b * x_sb + d * x_sd, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * dt_sb + d * dt_sd, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=md, other=0.0)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + d[:, None] * NSTATE + n[None, :], mask=mdn, other=0.0)
    Bv = tl.load(B_ptr + pid_b * B_sb + n * B_sn, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * C_sb + n * C_sn, mask=mn, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * 1.4426950408889634) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=mdn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=md, other=0.0) * x
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * z_sb + d * z_sd, mask=md, other=0.0).to(tl.float32)
        y = y * zz * _sigmoid(zz)
    tl.store(out_ptr + pid_b * o_sb + d * o_sd, y.to(out_ptr.dtype.element_ty), mask=md)


# --------------------------------------------------------------------------------------------
# a probe of Triton's layout choice (see _tile_index)
# --------------------------------------------------------------------------------------------
@triton.jit
def _tie_probe_kernel(x_ptr, L):
    a = tl.arange(0, 8)[:, None, None]
    b = tl.arange(0, 2)[None, :, None]
    c = tl.arange(0, 16)[None, None, :]
    off = tl.max_contiguous(c + a * L + b * (L * 8), [1, 1, 1])
    tl.store(x_ptr + off, tl.load(x_ptr + off) * 2.0)
