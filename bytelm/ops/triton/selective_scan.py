"""Fused Triton selective scan (Mamba-1): forward, backward and the one-step generation update.

Same maths and shapes as `bytelm.ops.selective_scan.selective_scan_ref` (the reference beside it):
    u, delta, z : (batch, dim, length)      bf16 / fp16 / fp32
    A           : (dim, state)              fp32
    B, C        : (batch, state, length)
    D, delta_bias : (dim,)                  fp32
    initial_state / final state : (batch, dim, state)  fp32
This file holds the launch logic and the autograd op; the kernels are in selective_scan_kernels.py.

How the kernels work (why they look the way they do)
-----------------------------------------------------
Each program owns one batch row and WD * LD channels, walks (a piece of) the sequence in chunks
of T=4 steps and keeps the state h (all `state` entries of its channels) in fp32 registers.
Tiles are 5-d: time, NPT states per thread, WD warps, KN state lanes, LD channel lanes (state
n = kn * NPT + npt). Triton lays a tile out from its loads, so the dims are placed such that time
and NPT stay in one thread and lanes go to channels first, then states (the placement depends on
the Triton version: `tie_order_ascending`). Inside a chunk the recurrence is unrolled
(`tl.static_range`); `sum(where(t == k, tile, -0.0), 0)` takes step k out of the in-thread time
axis and folds to a register read. No associative scan: each thread runs its states
sequentially, so the decays exp2(dt * A * log2 e) are the only per-element transcendental and
the backward's reverse recurrence finds exp(dt_{t+1} A) in registers. The per-(step, channel)
work (softplus, gate, D, the outputs and their gradients) would be repeated by each of a
channel's KN state lanes; where KN % T == 0 (LANE) state lane kn does it for step kn of the chunk
alone, and the step sizes (and, backward, dy) reach the other lanes by shuffles. Where KN is T
or 2T, the backward (but under the 128-register cap) goes two chunks at a time (`pairs`), the
pipelined forward four (`quads`; the training forward where its registers leave the grid room,
else two): lane kn takes 2T / KN (4T / KN)
adjacent steps of the group, so each per-step row is loaded or stored 4 (8) bytes a lane (bf16,
N=16) instead of 2; the chunks' state sums are reduce-scattered together straight into that
layout, and dt u reaches every lane from the lanes' own steps by shuffles (no u row a chunk).

B and C are small, so the wrapper packs them as (batch, chunk + 2, state block, T), bf16 if
they come in bf16 and fp32 otherwise (`pack_bc`): no masks per (channel, state, step), and the
8 channel lanes that read each B, C value cost the L1 half the wavefronts in bf16 (the forward
is bound by them; the one convert a value is cheaper). The backward at N=16 (the 168-register
cap) reads them in fp32 instead, packed a second time from the rows (`saved_bc`): its loop is
bound by instructions, and the converts cost more there than the bytes. The forward stores the state
entering every chunk (batch, n_chunks, dim, state) when gradients are needed (state last: each
thread's NPT states of a channel are adjacent, one 16-byte store a chunk in bf16); the backward
reloads it, recomputes the chunk's states, walks the chunk in reverse for dh, sums dB and dC over
its channels before one atomic add per (state, step) per program. Nothing of size (batch, dim,
length, state) is stored. With few (batch, channel-block) programs the sequence is cut into
pieces run side by side (`segments`): a first pass finds the end state from zero (or, backward,
the gradient sent to the start) and the summed step sizes of sub-pieces of them (`_pieces`: more,
shorter walks for this lighter pass), and each piece starts from the combination of the
sub-pieces before (after) it. The forward's first pass is the main kernel's chunk pair or quad
loop with its outputs off (PRE) where the tile has one (scan_config's pre_pairs: on by default).
"""

from __future__ import annotations

import functools
import os
import re

import torch
import triton

from bytelm.ops.backend import needs_autograd
from bytelm.ops.triton.layout import cdiv, empty_output as _empty, length_major, like, next_pow2
from bytelm.ops.triton.layout import sm_count as _sm_count  # a module global: tests swap it
from bytelm.ops.triton.selective_scan_kernels import (
    _scan_bwd_kernel,
    _scan_bwd_segment_kernel,
    _scan_fwd_kernel,
    _scan_fwd_segment_kernel,
    _state_update_kernel,
    _tie_probe_kernel,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
def scan_config(nstate: int, backward: bool = False, input_dtype=torch.float32) -> dict:
    """Tile shape for a scan launch (and, forward, the checkpoints' dtype).

    T = 4 steps per chunk: one load per row of B and C (16 bytes in fp32, 8 in bf16:
    bc_bf16), and a small enough chunk that the
    backward holds its per-chunk tiles in registers. NPT = min(state, 8) states per thread (4 in
    the backward at N=16), so that the per-(step, channel) work -- softplus, gate, loads -- is
    shared by several states;
    KN = state_block / NPT lanes hold the other states and LD = 32 / KN lanes hold channels;
    WD warps hold more channels: 2 in the forward; 1 in the backward, where
    more warps per program cost more than the atomics they save (cross-warp sums of dB and dC
    go through shared memory and barriers). All measured on the H200: benchmarks/NOTES.md.

    ckpt_dtype: the dtype of the chunk checkpoints the forward stores for the backward (the
    backward reads either). Rule: bf16 when the inputs (u) are bf16, fp32 otherwise. bf16
    halves their memory (90M model at 8 x 8192: 38.7 -> 19.3 GB) and the backward's reads of
    them. Rounding a checkpoint to bf16 (<= 2^-8 relative) perturbs only the states recomputed
    from it, for 4 steps (each chunk restarts from its own checkpoint, so nothing compounds):
    out, du, dB, dD and the state gradients do not change; ddelta, dA, dC, dz, ddelta_bias
    move by about one bf16 rounding (<= 5e-3 relative in the interpreter, lengths 1 to 1000,
    N = 16 / 64: NOTES.md, "Checkpoints in bf16"). With bf16 inputs that is the size of the
    error they already carry (bf16 outputs, upstream gradient and results: largest error
    4.1e-3 -> 4.8e-3); with fp32 inputs it would be ~10^3-10^4 x their error: fp32 stays.
    """
    block_n = next_pow2(max(nstate, 1))
    npt = min(block_n, 8)
    kn = block_n // npt
    if kn > 32:
        raise ValueError(f"state size {nstate} is over the supported 256")
    if backward:
        npt = 4 if block_n == 16 else npt  # twice the programs; measured faster at N=16
        cfg = dict(T=4, NPT=npt, KN=block_n // npt, LD=32 // (block_n // npt), WD=1,
                   warps_per_sm=8, lane_steps=True,   # ~230-255 registers a thread at N=64
                   us_row=False,  # u's own step loaded: 2.842 vs 2.867 ms from the row (8 x 1536 x 8192)
                   # chunk pairs (where KN = T or 2T): the per-(step, channel) rows of two
                   # chunks loaded and stored together, half the one-step-a-lane wavefronts
                   # (NOTES.md, eleventh session): H200, bf16, one chunk -> pairs, 4 x 2048 x
                   # 8192 2.355 -> 2.268 ms, 8 x 1536 x 8192 2.956 -> 2.747, 2 x 1536 x 32768
                   # 3.973 -> 3.817, N=64 8 x 2048 x 2048 3.792 -> 3.458
                   pairs=True, pre_split=PRE_SPLIT, bc_bf16=True)
        if block_n == 16:
            # capped at 168 registers (ptxas .maxnreg): 12 one-warp programs an SM, so a
            # short batch cuts its sequence into more pieces (and, with lane_steps, faster than
            # uncapped except where backward_config uncaps: one piece that fits at 8 warps an
            # SM); no spills with triton 3.6
            # (the H200's) or 3.9 (offline sm_90 compiles, benchmarks/sass_bwd.py)
            cfg.update(maxnreg=168, warps_per_sm=12)
            # B and C (loaded in the chunk that uses them) hinted into L1 a chunk (pair) ahead.
            # H200, bf16, 0 -> 1 (NOTES.md, twelfth session): 8 x 2048 x 2048 (the 128 cap)
            # 1.014 -> 0.976 ms, 4 x 2048 x 8192 2.312 -> 2.290, 8 x 1536 x 8192 2.877 ->
            # 2.842, 2 x 1536 x 32768 3.809 -> 3.677; 2 and 4 no better; at N=64 (4 lines a
            # chunk) 3.472 -> 3.515: off there
            cfg.update(bc_prefetch=1)
            # B and C packed in fp32 for this backward (re-packed from the bf16 rows: ~8 MB a
            # layer at 8 x 8192): no bf16 -> fp32 conversions in the chunk pairs' loop (1122 ->
            # 1030 instructions a pair, sm_90, triton 3.6). H200, bf16 -> fp32 (NOTES.md,
            # seventeenth session): 8 x 1536 x 8192 2.694 -> 2.620 ms, 2 x 1536 x 32768 3.191 ->
            # 3.115; at N=64 3.345 -> 3.447, so bf16 stays there
            cfg.update(bc_bf16=False)
        return cfg
    # pipeline: chunk c + 1's step sizes, decays and rows are computed / loaded while chunk c's
    # recurrence runs, two chunks an iteration; pipeline=False: the one-chunk loop, which loads
    # chunk c + 1's rows (B and C too) while chunk c runs. pipeline applies to the
    # inference forward, pipeline_ckpt to the training forward (which also stores checkpoints).
    # H200, bf16, 8 x 2048 x 2048 (NOTES.md, fifth session): N=16 pipelined 0.499 -> 0.467 ms
    # (0.529 -> 0.527 with checkpoints; 8 x 1536 x 8192: 1.78 -> 1.52, 1.78 -> 1.74); N=64
    # inference 1.76 -> 1.64, but with checkpoints 3.70 -> 5.66: the one-chunk loop there
    # (pipeline_ckpt only up to N = 16).
    # lane_steps, lane_steps_ckpt (without / with checkpoints; used where KN % T == 0, e.g.
    # forward_config's N=16 tile with 4 states a thread): the per-(step, channel) work one step
    # a lane (module docstring). H200, bf16, NPT 4, off -> on (NOTES.md, ninth session, fourth
    # call), without / with checkpoints: 8 x 1536 x 8192 1.435 -> 1.218 / 1.594 -> 1.328 ms,
    # 4 x 2048 x 8192 1.141 -> 1.062 / 1.268 -> 1.115, 8 x 2048 x 2048 0.472 -> 0.392 / 0.498
    # -> 0.413. (Before the state sums by reduce-scatter and the step sizes by all-gather, the
    # first call, it lost without checkpoints.) At N=64 (KN 8, half the lanes idle; fifth
    # call) it wins without checkpoints (8 x 2048 x 2048, pipelined: 1.644 -> 1.472 ms) and
    # loses with them (one-chunk loop: 1.656 -> 1.801): lane_steps_ckpt only up to KN 4.
    # bc_bf16 (pack_bc: bf16 B and C stay bf16; the backward may pack its own, `saved_bc`) and
    # us_row / us_row_ckpt (D u's u one step a lane taken from the u row, not loaded again):
    # both cut L1 data-pipe wavefronts, which bound the forward (95% of peak, Nsight Compute),
    # for more instructions. H200, bf16 (NOTES.md, tenth session, fourth call), ms, default ->
    # bc_bf16 -> both: inference forward 4 x 2048 x 8192 1.085 -> 0.950 -> 1.104, 8 x 1536 x
    # 8192 1.221 -> 1.180 -> 1.241, N=64 1.505 -> 1.237 -> 1.249 (us_row off); training forward
    # 1.133 -> 1.046 -> 0.996, 1.331 -> 1.287 -> 1.242, 2 x 1536 x 32768 2.236 -> 2.019 ->
    # 2.020 (us_row_ckpt on); backward (us_row off, scan_config(backward=True)) 2.270 ->
    # 2.292, 2.842 -> 2.883, N=64 3.742 -> 3.630. Training step's scan -1.2% to -5.1%.
    # pairs (the pipelined loop, LANE, KN = T or 2T): two chunks' delta, z, D u's u loaded and
    # their output stored together (4 bytes a lane), as in the backward. H200, bf16 (NOTES.md,
    # eleventh session, fourth call), off -> on, inference / training forward, ms: 8 x 2048 x
    # 2048 0.378 -> 0.340 / 0.393 -> 0.373, 4 x 2048 x 8192 0.965 -> 0.870 / 1.011 -> 0.993,
    # 8 x 1536 x 8192 1.181 -> 1.072 / 1.254 -> 1.209, N=64 inference 1.246 -> 1.140. (The
    # training forward then loads u's steps for D u rather than taking them from the row; and
    # since the twelfth session dt u reaches every lane from those steps by shuffles, no u row
    # a chunk: 8 x 1536 x 8192 1.073 -> 1.030 / 1.207 -> 1.149.)
    # quads (inference) / quads_ckpt (training): four chunks an iteration instead of two, 4T / KN
    # steps a lane (8-byte accesses at N=16 with 4 states a thread): half the wavefronts of the
    # per-(step, channel) rows again, the same instructions a chunk and, inference, the same
    # registers (96, sm_90, triton 3.6); the training forward in quads takes 158 (12 warps an
    # SM against the pairs' 16): forward_config sets quads_ckpt where its grid fits at 12.
    # Measured: NOTES.md, twelfth and thirteenth sessions.
    # pre_pairs: the pre-pass of a sequence in pieces as the pair / quad loop with outputs off
    # (PRE; quads as `quads` says) where this launch's loop is one, else one chunk at a time
    # (_scan_fwd_segment_kernel). H200, 2 x 1536 x 32768, 4 sub-pieces a piece, training forward
    # 1.542 -> 1.483 ms (NOTES.md, fifteenth session).
    ckpt_dtype = torch.bfloat16 if input_dtype == torch.bfloat16 else torch.float32
    return dict(T=4, NPT=npt, KN=kn, LD=32 // kn, WD=2, warps_per_sm=8, pre_split=PRE_SPLIT,
                pre_pairs=True, pipeline=True, pipeline_ckpt=block_n <= 16, ckpt_dtype=ckpt_dtype,
                lane_steps=True, lane_steps_ckpt=kn <= 4, us_row=False, us_row_ckpt=True,
                bc_bf16=True, pairs=True, quads=True, quads_ckpt=False)


@functools.lru_cache(maxsize=None)
def tie_order_ascending() -> bool:
    """Does this Triton give lanes to equally-contiguous dims in dim order (3.6) or in reverse
    dim order (3.9)? Compiles a tiny probe for the current GPU and reads its layout."""
    if _INTERPRET:
        return False
    from triton.compiler import ASTSource
    src = ASTSource(fn=_tie_probe_kernel, signature={"x_ptr": "*fp32", "L": "i32"})
    ttgir = triton.compile(src, target=triton.runtime.driver.active.get_current_target()).asm["ttgir"]
    order = re.search(r"#blocked\d* = .*?order = \[(\d+), (\d+), (\d+)\]", ttgir)
    return order is not None and order.groups() == ("0", "1", "2")


def _layout_constexprs() -> dict:
    if tie_order_ascending():
        return dict(ASC=True, AX_NPT=4, AX_WD=3, AX_KN=2, AX_LD=1)
    return dict(ASC=False, AX_NPT=1, AX_WD=2, AX_KN=3, AX_LD=4)


def _tile(cfg):
    return {k: cfg[k] for k in ("T", "NPT", "WD", "KN", "LD")}


def _strides(u, z):
    """The kernels' (SB, SD, ST) for u-like tensors and (ZB, ZD, ZT) for z."""
    zs = z.stride() if z is not None else u.stride()
    return (*u.stride(), *zs)


def bc_dtype(cfg, dtype) -> torch.dtype:
    """The dtype `pack_bc` packs B and C of this dtype in for a launch of this cfg."""
    return torch.bfloat16 if cfg.get("bc_bf16") and dtype == torch.bfloat16 else torch.float32


def pack_bc(x, cfg):
    """(*lead, batch, state, length) -> (*lead, batch, n_chunks + 2, state block, T), zero padded:
    each thread's rows of a chunk sit together, and the kernels need no masks to read them (but
    the inference forward's quads, which run up to three chunks past the end: past the padding
    they mask). lead: () for one tensor, (2,) for B and C stacked by `stack_bc`.
    cfg["bc_bf16"]: bf16 inputs stay bf16 (no rounding; half the bytes the kernels load), else fp32.
    One strided copy of the whole chunks (and one of a partial last chunk) into a zeroed tensor,
    through as_strided views: at small shapes the op's host time shows in its time, and slicing
    and unflattening cost ~4x the Python calls."""
    *lead, batch, nstate, length = x.shape
    T, block_n = cfg["T"], cfg["NPT"] * cfg["KN"]
    n_chunks = cdiv(length, T)
    full = length // T
    dtype = bc_dtype(cfg, x.dtype)
    # two chunks of padding beyond the last: the forward loads chunk c + 1 unmasked, and its
    # pipelined loop (in pairs) ends with a no-op chunk when it has an odd number of chunks
    out = x.new_zeros(*lead, batch, n_chunks + 2, block_n, T, dtype=dtype)
    *sx, sb, sn, sl = x.stride()
    # (*lead, batch, chunk, state, step) views: out's first full chunks and states, x's whole chunks
    shape = (*lead, batch, full, nstate, T)
    out.as_strided(shape, out.stride()).copy_(x.as_strided(shape, (*sx, sb, T * sl, sn, sl)))
    if full < n_chunks:
        out[..., full, :nstate, :length - full * T].copy_(x[..., full * T:])
    return out


def unpack_bc(x, nstate, length, dtype=None, out=None):
    """`pack_bc` undone: (*lead, batch, state, length) in dtype, or written (cast) into out (any
    strides); one strided copy (two with a partial last chunk)."""
    *lead, batch, _, _, T = x.shape
    if out is None:
        out = x.new_empty(*lead, batch, nstate, length, dtype=dtype or x.dtype)
    full = length // T
    *so, ob, on, ol = out.stride()
    shape = (*lead, batch, full, nstate, T)
    out.as_strided(shape, (*so, ob, T * ol, on, ol)).copy_(x.as_strided(shape, x.stride()))
    if full * T < length:
        out[..., full * T:].copy_(x[..., full, :nstate, :length - full * T])
    return out


def stack_bc(B, C):
    """B and C (batch, state, length) as one (2, batch, state, length) view when they lie in one
    storage with the same strides, C after B (the mixer's B and C: rows of x_proj's output), so
    that `pack_bc` / `unpack_bc` move both in one copy; else None."""
    if (B.stride() != C.stride() or B.shape != C.shape or B.dtype != C.dtype
            or B.untyped_storage().data_ptr() != C.untyped_storage().data_ptr()):
        return None
    offset = C.storage_offset() - B.storage_offset()
    return B.as_strided((2, *B.shape), (offset, *B.stride())) if offset > 0 else None


def pack_bc_pair(B, C, cfg):
    """(Bp, Cp): `pack_bc` of each, by one copy where `stack_bc` can view them together."""
    BC = stack_bc(B, C)
    if BC is None:
        return pack_bc(B, cfg), pack_bc(C, cfg)
    return pack_bc(BC, cfg).unbind(0)


def saved_bc(Bp, Cp, B, C, cfg_b):
    """What a forward saves of its packed B and C (Bp, Cp; B, C: the rows they came from) for a
    backward of config cfg_b: the pair where cfg_b reads both in their dtypes, else (None, None),
    and the backward packs the rows again in its own dtypes (`pack_bc_pair`, one copy)."""
    same = Bp.dtype == bc_dtype(cfg_b, B.dtype) and Cp.dtype == bc_dtype(cfg_b, C.dtype)
    return (Bp, Cp) if same else (None, None)


def segments(batch, dim, n_chunks, cfg, device) -> int:
    """How many pieces to cut the sequence into. Each program walks its piece serially, so
    with few (batch, channel-block) programs the SMs idle; each piece beyond the first costs
    an extra pass (end states from zero), so cut only while all pieces' warps still fit on
    the GPU at once (cfg["warps_per_sm"], set by the kernels' registers), and keep >= 16
    chunks per piece. cfg["SEG"] overrides."""
    if "SEG" in cfg:
        return max(1, min(cfg["SEG"], n_chunks))
    if device.type != "cuda":
        return 1
    fit = cfg["warps_per_sm"] * _sm_count(device)
    return max(1, min(fit // _grid_warps(batch, dim, cfg), n_chunks // 16))


# Sub-pieces a piece in the pre-pass. H200, bf16, 2 x 1536 x 32768 (4 pieces), training forward
# (pre-pass in the quad loop) / backward, ms, pre_split 1 / 2 / 3 / 4 / 6 / 8: 1.690 / 1.559 /
# 1.498 / 1.483 / 1.487 / 1.470 and 3.488 / 3.308 / 3.254 / 3.207 / 3.205 / 3.181 (NOTES.md,
# fifteenth session). Past one wave of the pre-pass's programs (2 sub-pieces forward, 3
# backward, by their registers) it still gains: a program's walk is latency-bound.
PRE_SPLIT = 8


def _pieces(batch, dim, n_chunks, cfg, device):
    """(nseg, cps, sub, nsub): `segments`' pieces of cps chunks, and the pre-pass's finer cut:
    sub = cfg["pre_split"] sub-pieces a piece (fewer where a sub-piece would be under 4
    chunks, one group of the quad loop), of cps / sub chunks, nsub in all. The pre-pass runs
    each sub-piece from zero, each program walking its sub-piece serially: the cut gives it
    more, shorter walks, and the main pass's programs a longer combination at their start
    (one exp2 and two loads a sub-piece)."""
    nseg = segments(batch, dim, n_chunks, cfg, device)
    if nseg == 1:
        return 1, n_chunks, 1, 1
    # the main pass's programs combine up to (nseg - 1) sub sub-pieces, a serial chain of
    # loads: kept to ~32 (many pieces, e.g. batch 1; not measured beyond 4 pieces)
    sub = max(1, min(int(cfg.get("pre_split", 1)), cdiv(n_chunks, nseg) // 4, 32 // nseg))
    # cps < n_chunks still (sub <= a piece / 4): rounding up never leaves one piece
    cps = cdiv(cdiv(n_chunks, nseg), sub) * sub
    return cdiv(n_chunks, cps), cps, sub, cdiv(n_chunks, cps // sub)


def _grid_warps(batch, dim, cfg) -> int:
    """Warps of a launch over the whole sequence: (batch, channel block) programs of WD warps."""
    return batch * cdiv(dim, cfg["WD"] * cfg["LD"]) * cfg["WD"]


def backward_config(nstate, batch, dim, device) -> dict:
    """scan_config(backward=True) for this launch. N=16 runs capped at 168 registers a thread
    (12 one-warp programs an SM), and at 128 (16 an SM) where its programs do not all fit on
    the GPU at 12 an SM. H200, bf16, per-(step, channel) work one step a lane (NOTES.md, ninth
    session), uncapped / 168 / 128: 8 x 2048 x 2048 (2048 programs, 1.3 waves at 12 an SM, one
    at 16) 1.365 / 1.197 / 1.026 ms; 8 x 1536 x 8192 (1536 programs, one wave at 12) 3.198 /
    3.037 / 3.183; 4 x 2048 x 8192 (1024) 2.688 / 2.360 / 2.579 (2 pieces at 16 an SM); 2 x
    1536 x 32768 (384, cut into pieces) 6.454 (2 pieces; 4.059 uncapped but cut as for 14 an SM)
    / 4.053 (4) / 4.141 (5). Beyond 16 an SM's worth of programs: 128 by the same reasoning,
    not measured. The 128 cap compiles without spills with triton 3.6; 3.9 spills 24 bytes a
    thread (offline sm_90 compiles).

    Uncapped (255 registers, 8 warps an SM) where the capped launch would run in one piece anyway
    (more than half of 12 an SM's programs) and its programs all fit at 8 an SM: the cap then
    buys no occupancy, only instructions (chunk pairs at 168: 1122 a pair; uncapped 1085, sm_90,
    triton 3.6). H200, bf16, twelfth session (chunk pairs, B/C prefetch): 4 x 2048 x 8192 (1024
    programs on 132 SMs) 2.160 -> 1.931 ms (200: 2.058, 232: 2.084); 8 x 1536 x 8192 (1536,
    more than 8 an SM) 2.678 capped, 3.714 uncapped.

    bc_bf16: the dtype the launch reads B and C in. fp32 (packed again from the rows: `saved_bc`)
    at the 168 cap only; bf16 (the forward's packing) uncapped and at 128, where fp32 measured
    slower or no faster (seventeenth session)."""
    cfg = scan_config(nstate, backward=True)
    sms = _sm_count(device)
    if not cfg.get("maxnreg") or not sms:
        return cfg
    warps = _grid_warps(batch, dim, cfg)
    if warps > cfg["warps_per_sm"] * sms:
        # one chunk at a time: chunk pairs spill under 128 registers (184 bytes a thread,
        # triton 3.6) and measured 0.960 -> 1.160 ms at 8 x 2048 x 2048 (1.181 at 168); B and C
        # as the forward packed them (bf16): fp32 measured no faster here (0.984 -> 0.973 /
        # 0.982 ms, seventeenth session), so no re-pack
        return dict(cfg, maxnreg=128, warps_per_sm=16, pairs=False, bc_bf16=True)
    if 2 * warps > cfg["warps_per_sm"] * sms and warps <= 8 * sms:
        # B and C in bf16 here: fp32 measured slower uncapped (4 x 2048 x 8192: 1.952 -> 2.079
        # ms, seventeenth session)
        return dict(cfg, maxnreg=None, warps_per_sm=8, bc_bf16=True)
    return cfg


def forward_config(nstate, batch, dim, length, device, input_dtype=torch.float32) -> dict:
    """scan_config for this forward launch. N=16 with bf16 inputs on a GPU takes 4 states a
    thread instead of 8 (NPT 4, KN 4: twice the warps for this latency-bound loop, the
    per-(step, channel) work one step a lane, chunk pairs or quads):

    - where its grid fits on the GPU at 12 warps an SM, in one piece, its training forward runs
      in chunk quads (quads_ckpt: 158 registers, sm_90, triton 3.6; 164 with 3.9; 12 warps an
      SM against the pairs' 127 and 16);
    - where it fits in one piece only at more warps an SM (8 x 2048 x 2048: 2048 warps), in
      pairs;
    - where the sequence must be cut into pieces (short batches), in quads too, its pieces
      counted at 12 warps an SM.

    A grid of 4-6 warps an SM at 8 (529-792 warps on 132 SMs: 4 x 1536, 3 x 2048 channels) is
    one piece here but would be two at 12: it runs in one piece, at low occupancy (not
    measured against two pieces).

    H200, bf16, training forward (NOTES.md, thirteenth session), pairs -> quads: 4 x 2048 x 8192
    (1024 warps, one piece) 0.953 -> 0.835 ms, 8 x 1536 x 8192 (1536 warps on 132 SMs) 1.150 ->
    1.032, 8 x 2048 x 2048 (two waves) 0.355 -> 0.443 (hence pairs there); 2 x 1536 x 32768,
    NPT 8 capped at 168 registers in 8 pieces (the rule before) -> NPT 4 in quads in 4 pieces,
    2.029 -> 1.849 (inference forward 1.925 -> 1.822). Earlier: NPT 4 in one piece against NPT
    8 (eighth session, pairs): 8 x 1536 x 8192 1.623 -> 1.591, 4 x 2048 x 8192 (2 pieces -> 1)
    1.383 -> 1.313; NPT 4 in pieces lost before chunk pairs and quads (2 x 1536 x 32768, 5 -> 2
    pieces at 8 warps an SM, 2.399 -> 3.634). pack_bc's layout depends only on T and NPT x KN,
    so B and C pack the same either way. Off the GPU (no SM count: the interpreter) the
    one-piece choice, NPT 4 in quads, so that the tests run the tile the GPU launches. Without
    scan_config's `quads` the training forward stays in pairs everywhere. Other
    state sizes and fp32 inputs (fp32 checkpoints: ~232 registers): scan_config's tile."""
    cfg = scan_config(nstate, input_dtype=input_dtype)
    if (cfg["NPT"], cfg["KN"]) != (8, 2) or cfg["ckpt_dtype"] != torch.bfloat16:
        return cfg
    half = dict(cfg, NPT=4, KN=4, LD=8)
    quads = bool(cfg["quads"])  # scan_config's switch for groups of four chunks
    if segments(batch, dim, cdiv(length, cfg["T"]), half, device) > 1:
        return dict(half, quads_ckpt=quads, warps_per_sm=12 if quads else half["warps_per_sm"])
    sms = _sm_count(device)
    if sms is None or _grid_warps(batch, dim, half) <= 12 * sms:
        return dict(half, quads_ckpt=quads)
    return half


def _register_cap(cfg) -> dict:
    """Launch option capping a kernel's registers per thread (ptxas .maxnreg), when cfg sets one."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}


def _launch_consts(cfg, delta_softplus, delta_bias, lane_key):
    # LANE: the per-(step, channel) work one step a lane where cfg[lane_key] asks for it
    # (scan_config) and a channel's state lanes are a multiple of the chunk's steps
    lane = bool(cfg.get(lane_key)) and cfg["KN"] % cfg["T"] == 0
    return dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                FAST_LOG=not _INTERPRET, LANE=lane, num_warps=cfg["WD"], **_layout_constexprs(),
                **_tile(cfg))


def checkpoint_nbytes(batch, dim, length, nstate, cfg) -> int:
    """Bytes of the chunk checkpoints `scan_fwd` stores for the backward with this cfg."""
    itemsize = cfg.get("ckpt_dtype", torch.float32).itemsize
    return batch * cdiv(length, cfg["T"]) * nstate * dim * itemsize


def scan_fwd(u, delta, A, Bp, Cp, D=None, z=None, delta_bias=None, delta_softplus=False,
             initial_state=None, store_ckpt=False, cfg=None):
    """Launch the forward. Bp, Cp: B and C packed by `pack_bc` with the same cfg. Returns out
    (u.dtype), the final state (fp32) and the chunk checkpoints (batch, n_chunks, dim, state)
    in cfg["ckpt_dtype"] (bf16 for bf16 inputs by default: `scan_config`), or None when not
    asked for."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    cfg = cfg or forward_config(nstate, batch, dim, length, u.device, input_dtype=u.dtype)
    n_chunks = cdiv(length, cfg["T"])
    nseg, cps, sub, nsub = _pieces(batch, dim, n_chunks, cfg, u.device)
    f32 = dict(device=u.device, dtype=torch.float32)
    out = _empty(like=u)
    h_last = _empty(batch, dim, nstate, **f32)
    ckpt = (_empty(batch, n_chunks, dim, nstate, device=u.device,
                   dtype=cfg.get("ckpt_dtype", torch.float32)) if store_ckpt else None)
    hseg = torch.empty(batch, nsub, nstate, dim, **f32)
    lseg = torch.empty(batch, nsub, dim, **f32)
    consts = _launch_consts(cfg, delta_softplus, delta_bias,
                            "lane_steps_ckpt" if store_ckpt else "lane_steps")
    grid = (batch, cdiv(dim, cfg["WD"] * cfg["LD"]))
    bias = delta_bias if delta_bias is not None else A
    # chunk pairs (the pipelined loop, one step a lane, KN = T or 2T): see the backward's
    pipeline = cfg.get("pipeline_ckpt" if store_ckpt else "pipeline", True)
    pair = (bool(cfg.get("pairs")) and pipeline and consts["LANE"]
            and cfg["KN"] in (cfg["T"], 2 * cfg["T"]))
    if nseg > 1:
        # the pre-pass over the sub-pieces of every piece but the last (all full): the main
        # kernel's pair loop without outputs where the tile has one (`_fwd_pre_pass`)
        pre_grid = grid + ((nseg - 1) * sub,)
        if pair and cfg.get("pre_pairs", True):
            _fwd_pre_pass(pre_grid, u, delta, A, Bp, bias, hseg, lseg, n_chunks, cps // sub,
                          nsub, bool(cfg.get("quads")), consts)
        else:
            _scan_fwd_segment_kernel[pre_grid](
                u, delta, A, Bp, bias, hseg, lseg, length, dim, nstate, n_chunks, cps // sub,
                nsub, *_strides(u, z), **consts)
    _scan_fwd_kernel[grid + (nseg,)](
        u, delta, A, Bp, Cp, D if D is not None else A, z if z is not None else u, bias,
        initial_state if initial_state is not None else h_last, hseg, lseg,
        out, h_last, ckpt if ckpt is not None else h_last,
        length, dim, nstate, n_chunks, cps, nseg, sub, nsub, *_strides(u, z),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=initial_state is not None,
        STORE_CKPT=store_ckpt, PIPELINE=pipeline,
        US_ROW=bool(cfg.get("us_row_ckpt" if store_ckpt else "us_row")), PAIR=pair,
        QUADS=pair and bool(cfg.get("quads_ckpt" if store_ckpt else "quads")),
        **_register_cap(cfg), **consts)
    return out, h_last, ckpt


def _fwd_pre_pass(grid, u, delta, A, Bp, bias, hseg, lseg, n_chunks, cps_sub, nsub, quads, consts):
    """`_scan_fwd_kernel` with PRE: each program's sub-piece end state from zero and summed
    step sizes into hseg, lseg (the inputs the launch does not read stand in for themselves)."""
    batch, dim, length = u.shape
    _scan_fwd_kernel[grid](
        u, delta, A, Bp, Bp, A, u, bias, hseg, hseg, lseg, u, hseg, hseg,
        length, dim, A.shape[1], n_chunks, cps_sub, nsub, 1, nsub, *_strides(u, None),
        HAS_D=False, HAS_Z=False, HAS_H0=False, STORE_CKPT=False, PIPELINE=True, US_ROW=False,
        PAIR=True, QUADS=quads, PRE=True, **consts)


def scan_bwd(u, delta, A, Bp, Cp, D, z, delta_bias, delta_softplus, ckpt, t_chunk, dout, dlast,
             need_dh0, cfg=None, dz=None):
    """Launch the backward over checkpoints written with chunks of t_chunk steps, fp32 or bf16
    (the kernel reads ckpt's dtype). Returns du, ddelta, dz in the inputs' dtypes, dB and dC
    packed like Bp (fp32) and stacked (2, ...) (unpacked by one `unpack_bc`), dA, dD, ddelta_bias
    fp32 and the initial state's gradient (or None).
    dz: where to write z's gradient (u's strides), e.g. a slice of a larger gradient buffer.
    dout: any layout with adjacent steps is read as it is (its own strides; else copied)."""
    batch, dim, length = u.shape
    dout = length_major(dout)
    o_like_u = dout.stride() == u.stride()
    nstate = A.shape[1]
    n_chunks = ckpt.shape[1]
    cfg = dict(cfg or backward_config(nstate, batch, dim, u.device), T=t_chunk)
    nseg, cps, sub, nsub = _pieces(batch, dim, n_chunks, cfg, u.device)
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = _empty(like=u), _empty(like=delta)
    if z is not None and dz is None:
        dz = _empty(like=u, dtype=z.dtype)  # laid out like u (kernel strides)
    assert dz is None or dz.stride() == u.stride()
    # the kernels' atomic sums: dB, dC (packed alike, unpacked after) zeroed by one memset; the
    # parameters' gradients each its own tensor (autograd may keep them as .grad)
    dBCp = torch.zeros(2, *Bp.shape, **f32)
    dBp, dCp = dBCp.unbind(0)
    dA = torch.zeros(dim, nstate, **f32)
    dD = torch.zeros(dim, **f32) if D is not None else None
    dbias = torch.zeros(dim, **f32) if delta_bias is not None else None
    dh0 = _empty(batch, dim, nstate, **f32) if need_dh0 else None
    gseg = torch.empty(batch, nsub, nstate, dim, **f32)
    lseg = torch.empty(batch, nsub, dim, **f32)
    consts = _launch_consts(cfg, delta_softplus, delta_bias, "lane_steps")
    # bc_prefetch: B and C hinted into L1 that many chunks (pairs) ahead (inline PTX, which the
    # interpreter does not run)
    consts["BC_PF"] = 0 if _INTERPRET else int(cfg.get("bc_prefetch", 0))
    grid = (batch, cdiv(dim, cfg["WD"] * cfg["LD"]))
    bias = delta_bias if delta_bias is not None else A
    zz = z if z is not None else u
    if nseg > 1:
        # the sub-pieces of every piece but the first (the last may be short)
        _scan_bwd_segment_kernel[grid + (nsub - sub,)](
            delta, A, Cp, zz, bias, dout, gseg, lseg, length, dim, nstate, n_chunks, cps // sub,
            nsub, sub, *_strides(u, z), *dout.stride(), O_LIKE_U=o_like_u, HAS_Z=z is not None,
            **consts)
    # dB, dC summed over channel lanes by a reduce-scatter (one warp per program, and at least
    # one (state, step) value per lane at the end: T * NPT >= LD)
    rs = (cfg.get("reduce_scatter", True) and cfg["WD"] == 1 and 2 <= cfg["LD"] <= cfg["T"] * cfg["NPT"])
    log_ld = cfg["LD"].bit_length() - 1
    # chunk pairs: where the per-(step, channel) work is one step a lane and a pair's steps
    # spread evenly over the state lanes (KN = T or 2T)
    pair = bool(cfg.get("pairs")) and consts["LANE"] and cfg["KN"] in (cfg["T"], 2 * cfg["T"])
    _scan_bwd_kernel[grid + (nseg,)](
        u, delta, A, Bp, Cp, D if D is not None else A, zz, bias, ckpt, dout,
        dlast if dlast is not None else A, gseg, lseg,
        du, ddelta, dA, dBp, dCp, dD if dD is not None else dA, dz if dz is not None else du,
        dbias if dbias is not None else dA, dh0 if dh0 is not None else dA,
        length, dim, nstate, n_chunks, cps, sub, nsub, *_strides(u, z), *dout.stride(),
        O_LIKE_U=o_like_u,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DLAST=dlast is not None,
        STORE_DH0=need_dh0, RS=rs, LOG_LD=log_ld, RS_ROUNDS=min(cfg.get("rs_rounds", log_ld), log_ld),
        US_ROW=bool(cfg.get("us_row")) and not pair, PAIR=pair,
        **_register_cap(cfg), **consts)
    return du, ddelta, dA, dBCp, dD, dz, dbias, dh0


class SelectiveScanFn(torch.autograd.Function):
    """Fused selective scan; arguments and shapes as `selective_scan_ref`. Saves the inputs and
    state checkpoints every chunk (T steps; bf16 for bf16 inputs, else fp32), never the per-step
    states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, need_grad):
        # u, delta and the outputs share u's strides; z keeps its own (a slice of in_proj's output)
        u, z = length_major(u), length_major(z)
        delta = like(delta, u)
        A = A.contiguous().float()
        D = D.contiguous().float() if D is not None else None
        delta_bias = delta_bias.contiguous().float() if delta_bias is not None else None
        h0 = initial_state.contiguous().float() if initial_state is not None else None
        cfg = forward_config(A.shape[1], *u.shape, u.device, input_dtype=u.dtype)
        # B and C are small (batch, state, length): a packed copy (pack_bc) saves the kernels
        # computing masks for every (channel, state, step); the backward may pack its own
        Bp, Cp = pack_bc_pair(B, C, cfg)
        out, h_last, ckpt = scan_fwd(u, delta, A, Bp, Cp, D, z, delta_bias, delta_softplus, h0,
                                     store_ckpt=need_grad, cfg=cfg)
        if need_grad:
            ctx.bc_dtypes = (B.dtype, C.dtype)
            # (T: the forward's chunk, which the checkpoints and the packing follow)
            ctx.cfg_b = dict(backward_config(A.shape[1], *u.shape[:2], u.device), T=cfg["T"])
            Bp, Cp = saved_bc(Bp, Cp, B, C, ctx.cfg_b)
            B, C = (None, None) if Bp is not None else (B, C)
            ctx.save_for_backward(u, delta, A, Bp, Cp, B, C, D, z, delta_bias, ckpt)
            ctx.delta_softplus = delta_softplus
            ctx.t_chunk = cfg["T"]
            ctx.has_h0 = initial_state is not None
            # an unused final state's (or output's) gradient stays None: no zero tensor made and
            # read for it
            ctx.set_materialize_grads(False)
        return out, h_last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, Bp, Cp, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        if dout is None:  # only the final state is used
            dout = torch.zeros_like(u)
        if Bp is None:
            Bp, Cp = pack_bc_pair(B, C, ctx.cfg_b)
        du, ddelta, dA, dBCp, dD, dz, dbias, dh0 = scan_bwd(
            u, delta, A, Bp, Cp, D, z, delta_bias, ctx.delta_softplus, ckpt, ctx.t_chunk,
            dout, dlast.contiguous() if dlast is not None else None,
            need_dh0=ctx.has_h0, cfg=ctx.cfg_b)
        nstate, length = A.shape[1], u.shape[2]
        if ctx.bc_dtypes[0] == ctx.bc_dtypes[1]:
            dB, dC = unpack_bc(dBCp, nstate, length, ctx.bc_dtypes[0]).unbind(0)
        else:
            dB, dC = (unpack_bc(g, nstate, length, t) for g, t in zip(dBCp, ctx.bc_dtypes))
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, dh0, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_final_state=False):
    """Fused selective scan; arguments, shapes and results as `selective_scan_ref`."""
    if u.shape[-1] == 0:  # nothing to scan: the reference's result
        from bytelm.ops.selective_scan import selective_scan_ref
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  initial_state, return_final_state)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    # without autograd (evaluation) no checkpoints are stored
    need_grad = needs_autograd(*inputs, initial_state)
    out, h_last = SelectiveScanFn.apply(*inputs, delta_softplus, initial_state, need_grad)
    return (out, h_last) if return_final_state else out


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False):
    """One generation step; arguments as `selective_state_update_ref` (state updated in place).

    state: (batch, dim, nstate) fp32; x, dt, z: (batch, dim); A: (dim, nstate); B, C: (batch, nstate).
    Returns out (batch, dim) in x.dtype.
    """
    batch, dim = x.shape
    nstate = A.shape[1]
    A = A.contiguous().float()
    out = _empty(like=x)
    block_n = next_pow2(nstate)
    block_d = max(1, min(next_pow2(dim), 4096 // block_n, 64))
    zz = z if z is not None else x
    _state_update_kernel[(batch, cdiv(dim, block_d))](
        state, x, dt, A, B, C, D if D is not None else A, zz,
        dt_bias if dt_bias is not None else A, out, dim, nstate,
        *state.stride(), *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(),
        *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return out
