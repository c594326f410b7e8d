"""The fused Triton selective scan against the reference: outputs and every gradient.

On a CUDA machine the kernels run compiled at full size; without one, conftest.py sets
TRITON_INTERPRET=1 and the same tests run through Triton's interpreter on small shapes.
The reference runs in float64 on the same device from the same input values.
"""

import pytest
import torch

from bytelm.ops.selective_scan import selective_scan_fn, selective_scan_ref, selective_state_update_ref
from bytelm.ops.triton import selective_scan as tss
from bytelm.ops.triton.layout import cdiv

from kernel_checks import nan_empty, rel_err, round_bf16_like_the_gpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (batch, dim): the interpreter costs milliseconds per time step, so CPU shapes stay tiny;
# dims that are not multiples of the channel tile exercise the masks
SMALL = (2, 200) if CUDA else (2, 5)
LONG = (2, 200) if CUDA else (1, 3)
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1.5e-2)}  # (output, gradients)


def make_inputs(batch, dim, length, nstate, dtype, seed):
    """Fresh random inputs for one case, in the kernels' dtypes, on DEVICE."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    return dict(
        u=rnd(batch, dim, length, dt=dtype), delta=rnd(batch, dim, length, scale=0.5, dt=dtype),
        A=(-torch.rand(dim, nstate, generator=g) * 4 - 0.1).to(DEVICE),
        B=rnd(batch, nstate, length, dt=dtype), C=rnd(batch, nstate, length, dt=dtype),
        D=rnd(dim), z=rnd(batch, dim, length, dt=dtype), delta_bias=rnd(dim, scale=0.5),
        initial_state=rnd(batch, dim, nstate),
    )


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test."""
    monkeypatch.setattr(tss, "_empty", nan_empty)


@pytest.fixture(autouse=True)
def bf16_rounding_of_the_gpu(monkeypatch):
    """The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: make it round, so
    that bf16 outputs and checkpoints carry the GPU's errors (truncated bf16 checkpoints took
    dC at length 1, N = 1 from 1.3e-2 to 2.1e-2, over the tolerance; rounded: 1.3e-2)."""
    if not CUDA:
        round_bf16_like_the_gpu(monkeypatch.setattr)


def arrange(t, kind):
    """t (batch, dim, length) in another storage, as a model hands it over; kind is
    "cl<w>": a view of (batch, length, w * dim) storage (a linear layer's output, transposed), or
    "cm<w>": a view of (w * dim, batch, length) storage (one matmul over all positions, the
    mixer's channel-major layout); either way the last dim rows of the wider tensor."""
    batch, dim, length = t.shape
    width = int(kind[2:])
    if kind.startswith("cl"):
        wide = torch.randn(batch, length, width * dim, dtype=t.dtype, device=t.device)
        wide[..., (width - 1) * dim:] = t.transpose(1, 2)
        return wide[..., (width - 1) * dim:].transpose(1, 2)
    wide = torch.randn(width * dim, batch, length, dtype=t.dtype, device=t.device)
    wide[(width - 1) * dim:] = t.transpose(0, 1)
    return wide[(width - 1) * dim:].transpose(0, 1)


def stack_rows(B, C):
    """B and C (batch, state, length) as the rows of one channel-major (2 state, batch, length)
    tensor, C after B: x_proj's output in the mixer (packed and unpacked by one copy)."""
    wide = torch.cat([B.transpose(0, 1), C.transpose(0, 1)]).contiguous()
    n = B.shape[1]
    return wide[:n].transpose(0, 1), wide[n:].transpose(0, 1)


def scan_vs_reference(batch, dim, length, nstate, dtype, seed, drop=(), softplus=True, layout=None,
                      use=("out", "last")):
    """The kernels' and the float64 reference's results on the same inputs: three dicts
    (inputs, kernels, reference) keyed out, last and "d" + the name of each input with a
    gradient (the gradients of a random weighting of the results named in `use`: out, last).
    layout: input name -> `arrange` kind, and "BC": "stacked" for `stack_rows`."""
    x = make_inputs(batch, dim, length, nstate, dtype, seed)
    for name, kind in (layout or {}).items():
        if name == "BC":
            x["B"], x["C"] = stack_rows(x["B"], x["C"])
        else:
            x[name] = arrange(x[name], kind)
    if not softplus:  # then delta is a step size already: keep it positive, as callers do
        x["delta"], x["delta_bias"] = x["delta"].abs(), x["delta_bias"].abs()
    for name in drop:
        x[name] = None
    leaves = {k: v.requires_grad_() for k, v in x.items() if v is not None}
    x64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in x.items()}
    kw = dict(delta_softplus=softplus, return_final_state=True)

    out, last = tss.selective_scan_triton(**x, **kw)
    out_ref, last_ref = selective_scan_ref(**x64, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(DEVICE)
    loss = lambda o, h: sum((r.double() * w).sum() for r, w, name in  # noqa: E731
                            ((o, w_out, "out"), (h, w_last, "last")) if name in use)
    # (with the final state alone, z and D do not reach the loss: their gradients are zeros)
    unused = dict(allow_unused=True, materialize_grads=True)
    grads = torch.autograd.grad(loss(out, last), list(leaves.values()), **unused)
    grads_ref = torch.autograd.grad(loss(out_ref, last_ref), [x64[k] for k in leaves], **unused)
    ours = dict(out=out, last=last, **{"d" + k: v for k, v in zip(leaves, grads)})
    ref = dict(out=out_ref, last=last_ref, **{"d" + k: v for k, v in zip(leaves, grads_ref)})
    return x, ours, ref


def check_scan(batch, dim, length, nstate, dtype, seed, drop=(), softplus=True, layout=None,
               use=("out", "last")):
    x, ours, ref = scan_vs_reference(batch, dim, length, nstate, dtype, seed, drop, softplus, layout,
                                     use)
    tol_out, tol_grad = TOL[dtype]
    assert ours["out"].dtype == dtype and ours["last"].dtype == torch.float32
    assert rel_err(ours["out"], ref["out"]) < tol_out
    assert rel_err(ours["last"], ref["last"]) < 1e-5
    for name in [k for k, v in x.items() if v is not None]:
        a, b = ours["d" + name], ref["d" + name]
        assert a.dtype == x[name].dtype, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol_grad, f"d{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nstate", [1, 16, 64])
@pytest.mark.parametrize("length", [1, 17, 63, 64])
def test_scan_matches_reference(length, nstate, dtype):
    check_scan(*SMALL, length, nstate, dtype, seed=1000 * length + nstate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("drop,softplus", [
    (("z",), True), (("D", "delta_bias"), True), (("initial_state",), True),
    (("z", "D", "delta_bias", "initial_state"), False), ((), False),
], ids=["no_z", "no_D_bias", "no_h0", "bare", "no_softplus"])
def test_scan_optional_inputs(drop, softplus, dtype):
    check_scan(*SMALL, 33, 16, dtype, seed=7 + len(drop), drop=drop, softplus=softplus)


@pytest.mark.parametrize("length,nstate,dtype", [
    (1000, 16, torch.float32), (2048 + 7, 16, torch.bfloat16), (1000, 64, torch.bfloat16),
])
def test_scan_long_sequences(length, nstate, dtype):
    check_scan(*LONG, length, nstate, dtype, seed=length + nstate)


def override_scan_config(monkeypatch, **overrides):
    """Make every scan launch of the test use scan_config's tile shape with `overrides`."""
    config = tss.scan_config
    monkeypatch.setattr(tss, "scan_config", lambda *a, **k: dict(config(*a, **k), **overrides))


@pytest.mark.parametrize("nseg,pre_split", [(2, 1), (3, 1), (2, 2), (3, 2), (3, 3)])
def test_scan_in_segments(nseg, pre_split, monkeypatch):
    """Long sequences are cut into pieces run side by side (end states from zero, then the
    true start states): the results must not change. pre_split: the pre-pass cuts each piece
    into that many sub-pieces (150 steps, 38 chunks, 3 pieces: sub-pieces of 7 chunks, the last
    of 3; of 5 at pre_split 3, where the last piece has 2 sub-pieces, not 3). scan_config's
    tile (no chunk pairs here: the forward's pre-pass one chunk at a time; PRE:
    test_forward_pre_pass); the 70-step case's pieces are too short to split."""
    override_scan_config(monkeypatch, SEG=nseg, pre_split=pre_split)
    check_scan(*SMALL, 150, 16, torch.float32, seed=nseg)
    check_scan(*SMALL, 70, 4, torch.bfloat16, seed=nseg + 1, drop=("initial_state",))


@pytest.mark.parametrize("n_chunks,nseg,pre_split,expect", [
    (38, 3, 1, (3, 13, 1, 3)), (38, 3, 2, (3, 14, 2, 6)), (38, 3, 3, (3, 15, 3, 8)),
    (8192, 4, 2, (4, 2048, 2, 8)), (40, 1, 4, (1, 40, 1, 1)), (5, 4, 3, (3, 2, 1, 3)),
    (40, 2, 8, (2, 20, 5, 10))])
def test_pieces(n_chunks, nseg, pre_split, expect):
    """(pieces, chunks a piece, sub-pieces a piece, sub-pieces in all): pieces a multiple of
    the sub-piece count long, sub-pieces of >= 4 chunks (20-chunk pieces: 5 sub-pieces, not
    8); one piece, no pre-pass, takes no split."""
    cfg = dict(SEG=nseg, pre_split=pre_split)
    got = tss._pieces(1, 16, n_chunks, cfg, torch.device("cpu"))
    assert got == expect
    nseg, cps, sub, nsub = got
    assert cps % sub == 0 and cdiv(n_chunks, cps) == nseg and cdiv(n_chunks, cps // sub) == nsub


def test_pre_split_default(monkeypatch):
    """The 90M model's 2 x 1536 x 32768 scan on 132 SMs: 4 pieces of 384 warps (12 an SM);
    the pre-pass cuts each piece into PRE_SPLIT sub-pieces, forward and backward. At batch 1,
    8 pieces: fewer sub-pieces a piece, 32 // 8, so that a program combines <= 28 at its start."""
    monkeypatch.setattr(tss, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    sub = tss.PRE_SPLIT
    assert 1 < sub <= 8 and 2048 % sub == 0
    for batch, pieces, split in ((2, 4, sub), (1, 8, min(sub, 4))):
        fwd = tss.forward_config(16, batch, 1536, 32768, cuda, input_dtype=torch.bfloat16)
        bwd = tss.backward_config(16, batch, 1536, cuda)
        for cfg in (fwd, bwd):
            cps = 8192 // pieces
            assert tss._pieces(batch, 1536, 8192, cfg, cuda) == (pieces, cps, split, pieces * split)


@pytest.mark.parametrize("sms,batch,dim,cap", [
    (None, 8, 2048, 168), (132, 8, 1536, 168), (132, 8, 2048, 128), (132, 2, 1536, 168),
    (132, 16, 2048, 128), (132, 4, 2048, None), (132, 4, 1536, 168), (132, 8, 1056, None),
    (132, 8, 1064, 168)])
def test_backward_register_cap(sms, batch, dim, cap, monkeypatch):
    """N=16's backward runs capped at 168 registers (12 one-warp programs an SM), at 128 (16
    an SM) where its programs (8 channels each) do not all fit at 12 an SM: on 132 SMs, 1584;
    8 x 2048 channels are 2048 programs, and one chunk at a time (chunk pairs spill there).
    Uncapped (8 an SM) where the capped launch is one piece anyway (over 792 programs) and all
    fit at 8 an SM (1056): 4 x 2048 channels, 1024 programs; not 4 x 1536 (768: 2 pieces
    capped) nor 8 x 1064 (1064 programs). No SM count (not CUDA): 168. Other state sizes have
    no cap. B and C are read in fp32 (packed again) at the 168 cap alone: bf16 measured faster
    uncapped and no slower at 128."""
    monkeypatch.setattr(tss, "_sm_count", lambda device: sms)
    cfg = tss.backward_config(16, batch, dim, torch.device("cpu"))
    expect = {168: (168, 12), 128: (128, 16), None: (None, 8)}[cap]
    assert (cfg["maxnreg"], cfg["warps_per_sm"]) == expect
    assert tss._register_cap(cfg) == ({"maxnreg": cap} if cap else {})
    assert cfg["pairs"] == (cap != 128)   # chunk pairs spill under 128
    assert cfg["bc_bf16"] == (cap != 168)
    per_launch = ("maxnreg", "warps_per_sm", "pairs", "bc_bf16")
    assert {k: v for k, v in cfg.items() if k not in per_launch} == \
        {k: v for k, v in tss.scan_config(16, backward=True).items() if k not in per_launch}
    assert not tss.backward_config(64, 16, 2048, torch.device("cpu")).get("maxnreg")


@pytest.mark.parametrize("sms,batch,dim,length,quads,warps_per_sm", [
    (132, 8, 1536, 8192, True, 8), (132, 4, 2048, 8192, True, 8), (132, 8, 2048, 2048, False, 8),
    (127, 8, 1536, 8192, False, 8), (132, 2, 1536, 32768, True, 12), (132, 2, 1536, 8192, True, 12),
    (132, 4, 1536, 8192, True, 8)])
def test_forward_config_n16_bf16(sms, batch, dim, length, quads, warps_per_sm, monkeypatch):
    """N=16, bf16, on a GPU: 4 states a thread. The training forward in chunk quads where its
    warps (two a program of 8 channels) fit at 12 an SM in one piece: 8 x 1536 channels are
    1536 warps, 1584 fit on 132 SMs, 1524 on 127; 8 x 2048 are 2048 (pairs). Short batches,
    whose sequence is cut into pieces (2 x 1536: 384 warps, 2 pieces at 8 an SM), in quads too,
    their pieces counted at 12 warps an SM; 4 x 1536 (768 warps) is one piece at 8 an SM and
    stays one. B and C pack as for scan_config's tile."""
    monkeypatch.setattr(tss, "_sm_count", lambda device: sms)
    cfg = tss.forward_config(16, batch, dim, length, torch.device("cuda"), torch.bfloat16)
    assert tss.segments(batch, dim, length // 4, cfg, torch.device("cuda")) == (1 if warps_per_sm == 8 else 4)
    tile = tss.scan_config(16, input_dtype=torch.bfloat16)
    assert (cfg["NPT"], cfg["KN"], cfg["LD"], cfg["quads_ckpt"], cfg["warps_per_sm"]) == \
        (4, 4, 8, quads, warps_per_sm)
    other = ("NPT", "KN", "LD", "quads_ckpt", "warps_per_sm")
    assert {k: v for k, v in cfg.items() if k not in other} == {k: v for k, v in tile.items() if k not in other}
    x = torch.randn(2, 16, 21)
    assert torch.equal(tss.pack_bc(x, cfg), tss.pack_bc(x, tile))


def test_forward_config_elsewhere(monkeypatch):
    """Other state sizes and fp32 / fp16 inputs: scan_config's tile. N=16 bf16 off the GPU (no
    SM count: the interpreter's tests): the GPU's one-piece choice, NPT 4 in quads; without
    scan_config's quads, in pairs."""
    monkeypatch.setattr(tss, "_sm_count", lambda d: 132 if d.type == "cuda" else None)
    for nstate, dtype in ((64, torch.bfloat16), (16, torch.float32), (16, torch.float16)):
        cfg = tss.forward_config(nstate, 8, 1536, 8192, torch.device("cuda"), dtype)
        assert cfg == tss.scan_config(nstate, input_dtype=dtype), (nstate, dtype)
    cpu = tss.forward_config(16, 8, 1536, 8192, torch.device("cpu"), torch.bfloat16)
    assert (cpu["NPT"], cpu["KN"], cpu["quads_ckpt"], cpu["warps_per_sm"]) == (4, 4, True, 8)
    override_scan_config(monkeypatch, quads=False)
    for dev in ("cpu", "cuda"):
        assert not tss.forward_config(16, 8, 1536, 8192, torch.device(dev), torch.bfloat16)["quads_ckpt"]
        assert tss.forward_config(16, 2, 1536, 32768, torch.device(dev), torch.bfloat16)["warps_per_sm"] == 8


@pytest.mark.parametrize("reduce_scatter,rs_rounds", [(True, None), (True, 1), (True, 0), (False, None)],
                         ids=["reduce_scatter", "one_round", "atomics_only", "butterfly"])
def test_scan_dbc_channel_sums(reduce_scatter, rs_rounds, monkeypatch):
    """The backward sums dB and dC over channel lanes by a reduce-scatter (the default; or
    fewer rounds of it, the lanes left with partial sums adding them by atomics) or by a
    butterfly (other tile shapes, or reduce_scatter=False): all must give the reference's
    gradients."""
    override_scan_config(monkeypatch, reduce_scatter=reduce_scatter,
                         **({} if rs_rounds is None else dict(rs_rounds=rs_rounds)))
    check_scan(*SMALL, 33, 16, torch.float32, seed=11)
    check_scan(*SMALL, 21, 64, torch.bfloat16, seed=12)


@pytest.mark.parametrize("bc_bf16", [True, False], ids=["bc_bf16", "bc_fp32"])
def test_scan_bc_packing(bc_bf16, monkeypatch):
    """bc_bf16 (the default): bf16 B and C are packed in bf16 (lossless; half the bytes the
    kernels load); else in fp32. Both must give the reference's results; fp32 B and C stay fp32."""
    assert tss.scan_config(16)["bc_bf16"]
    override_scan_config(monkeypatch, bc_bf16=bc_bf16)
    cfg = tss.scan_config(16)
    assert tss.pack_bc(torch.randn(2, 16, 9).bfloat16(), cfg).dtype == (torch.bfloat16 if bc_bf16 else torch.float32)
    assert tss.pack_bc(torch.randn(2, 16, 9), cfg).dtype == torch.float32
    check_scan(*SMALL, 33, 16, torch.bfloat16, seed=13)
    check_scan(*SMALL, 21, 64, torch.bfloat16, seed=14, layout=dict(u="cm1", delta="cm1", z="cm2"))
    check_scan(*SMALL, 17, 16, torch.float32, seed=15)


@pytest.mark.parametrize("lane_steps,us_row", [(True, False), (True, True), (False, False)],
                         ids=["one_step_a_lane", "one_step_a_lane_u_from_row", "every_lane"])
def test_scan_per_step_work_layouts(lane_steps, us_row, monkeypatch):
    """Where a channel has T state lanes (KN == T: N=16 with 4 states a thread, N=32) or a
    multiple (N=64: 8 lanes of which 4 work) the per-(step, channel) work -- softplus, gate, D,
    the outputs and their gradients -- can be done once, state lane kn taking step kn
    (lane_steps, lane_steps_ckpt); or every lane does every step. Both must give the
    reference's results: whole and cut into pieces (the pre-passes have both forms too), in
    both forward loops, with checkpoints (gradients) and without (the inference forward). With
    one step a lane, D u takes u at the lane's step from a second load or (us_row) from the row."""
    config = tss.scan_config
    tiles = {16: dict(NPT=4, KN=4, LD=8), 32: {}, 64: {}}   # N=16: forward_config's NPT 4 tile
    loops = [({}, torch.bfloat16, 33), (dict(SEG=3, pipeline=False, pipeline_ckpt=False), torch.bfloat16, 30),
             (dict(SEG=3, pipeline=True, pipeline_ckpt=True), torch.float32, 21)]
    for nstate, tile in tiles.items():
        for i, (loop, dtype, length) in enumerate(loops):
            over = dict(lane_steps=lane_steps, lane_steps_ckpt=lane_steps, us_row=us_row, us_row_ckpt=us_row,
                        **tile, **loop)
            monkeypatch.setattr(tss, "scan_config", lambda *a, over=over, **k: dict(config(*a, **k), **over))
            seed = 21 + 4 * i + nstate
            check_scan(*SMALL, length, nstate, dtype, seed=seed, drop=("initial_state",) if i == 1 else ())
            x = make_inputs(*SMALL, length, nstate, dtype, seed=seed)     # no gradients
            out = tss.selective_scan_triton(**x, delta_softplus=True)
            ref = selective_scan_ref(**{k: v.double() if v is not None else None for k, v in x.items()},
                                     delta_softplus=True)
            assert rel_err(out, ref) < TOL[dtype][0], (nstate, loop)


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "one_chunk"])
def test_scan_forward_loop_variants(monkeypatch, pipeline):
    """The forward's software-pipelined loop (the default but for N > 16 with checkpoints; two
    chunks per iteration, 9 and 6 chunks here: odd and even counts) and the one-chunk loop
    (next chunk's rows prefetched); also cut into pieces (3 and 2 chunks each)."""
    override_scan_config(monkeypatch, pipeline=pipeline, pipeline_ckpt=pipeline)
    check_scan(*SMALL, 33, 16, torch.float32, seed=13)
    check_scan(*SMALL, 21, 64, torch.bfloat16, seed=14)
    override_scan_config(monkeypatch, SEG=3)
    check_scan(*SMALL, 33, 16, torch.bfloat16, seed=15)
    check_scan(*SMALL, 21, 16, torch.float32, seed=16, drop=("initial_state",))


@pytest.mark.parametrize("ckpt_dtype", [torch.float32, torch.bfloat16], ids=["fp32_ckpt", "bf16_ckpt"])
def test_scan_checkpoint_dtypes_with_bf16_inputs(ckpt_dtype, monkeypatch):
    """bf16 inputs store bf16 checkpoints by default; either checkpoint dtype must give the
    reference's gradients within bf16 tolerances (pieces included: they reload checkpoints too)."""
    override_scan_config(monkeypatch, ckpt_dtype=ckpt_dtype)
    check_scan(*SMALL, 63, 16, torch.bfloat16, seed=21)
    check_scan(*SMALL, 45, 64, torch.bfloat16, seed=22)
    override_scan_config(monkeypatch, SEG=3)
    check_scan(*SMALL, 90, 16, torch.bfloat16, seed=23)


def test_scan_bf16_checkpoints_with_fp32_inputs_are_bf16_accurate(monkeypatch):
    """Forced on fp32 inputs, bf16 checkpoints leave the outputs, du, dB, dD and the state
    gradients exact to fp32 (they do not depend on the recomputed states) and the others within
    bf16 tolerance: why fp32 inputs keep fp32 checkpoints by default."""
    override_scan_config(monkeypatch, ckpt_dtype=torch.bfloat16)
    x, ours, ref = scan_vs_reference(*SMALL, 63, 16, torch.float32, seed=24)
    for key in ("out", "last", "du", "dB", "dD", "dinitial_state"):
        assert rel_err(ours[key], ref[key]) < 1e-5, key
    for key in ("ddelta", "dA", "dC", "dz", "ddelta_bias"):
        assert rel_err(ours[key], ref[key]) < TOL[torch.bfloat16][1], key


@pytest.mark.parametrize("dtype,expected", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
])
def test_checkpoint_dtype_follows_the_inputs(dtype, expected):
    """scan_fwd stores the checkpoints (batch, chunk, dim, state) in scan_config's dtype for the
    inputs, the size that checkpoint_nbytes says, and bf16 checkpoints are the fp32 states
    rounded to bf16."""
    batch, dim, length, nstate = 2, 5, 23, 16
    x = make_inputs(batch, dim, length, nstate, dtype, seed=25)
    A, D, bias, h0 = x["A"], x["D"], x["delta_bias"], x["initial_state"]
    cfg = tss.scan_config(nstate, input_dtype=dtype)
    assert cfg["ckpt_dtype"] == expected
    Bp, Cp = tss.pack_bc(x["B"], cfg), tss.pack_bc(x["C"], cfg)

    def checkpoints(ckpt_dtype):
        _, _, ckpt = tss.scan_fwd(x["u"], x["delta"], A, Bp, Cp, D, x["z"], bias, True, h0,
                                  store_ckpt=True, cfg=dict(cfg, ckpt_dtype=ckpt_dtype))
        return ckpt

    ckpt = tss.scan_fwd(x["u"], x["delta"], A, Bp, Cp, D, x["z"], bias, True, h0, store_ckpt=True)[2]
    assert ckpt.dtype == expected and ckpt.shape == (batch, 6, dim, nstate)
    assert ckpt.nbytes == tss.checkpoint_nbytes(batch, dim, length, nstate, cfg)
    exact, rounded = checkpoints(torch.float32), checkpoints(torch.bfloat16).float()
    # (batch, chunk, dim, state): the state entering chunk 0 is the initial state, same layout
    assert torch.equal(exact[:, 0], h0)
    # rounded to nearest (also in the interpreter: bf16_rounding_of_the_gpu): half a bf16 unit
    # in the last place, 2^-8 relative at most
    assert ((rounded - exact).abs() <= exact.abs() * 2.0 ** -8).all()
    assert rel_err(rounded, exact) > 0


@pytest.mark.parametrize("nstate", [5, 256])
def test_scan_odd_and_largest_state(nstate):
    check_scan(*SMALL, 9, nstate, torch.float32, seed=nstate)


def test_scan_accepts_strided_inputs_and_backend_switch():
    x = make_inputs(2, 6, 20, 4, torch.float32, seed=3)
    # (batch, length, dim) storage seen as (batch, dim, length), as a model's projections give it
    x["u"] = x["u"].transpose(1, 2).contiguous().transpose(1, 2)
    x["z"] = x["z"].transpose(1, 2).contiguous().transpose(1, 2)
    out = selective_scan_fn(**x, delta_softplus=True, backend="triton")
    ref = selective_scan_fn(**x, delta_softplus=True, backend="ref")
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("layout", [
    dict(u="cm1", delta="cm1", z="cm2"),    # the mixer's: channel-major, z half of in_proj's output
    dict(u="cl1", delta="cl1", z="cl2"),    # channel-last (copied to length-major by the wrapper)
    dict(u="cm1", delta="cl1", z="cl1"),    # delta in another layout than u: copied to u's
], ids=["channel_major", "channel_last", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_layouts(layout, dtype):
    """Inputs in the layouts models produce: same results and gradients."""
    check_scan(*SMALL, 37, 16, dtype, seed=11, layout=layout)


@pytest.mark.parametrize("use", [("out",), ("last",)], ids=["out_only", "last_only"])
def test_scan_gradient_of_one_result(use, monkeypatch):
    """Only the output (the usual case) or only the final state feeds the loss: the other's
    gradient reaches the backward as None (no zero tensor is made for it; an unused output's
    is zeros there), and the gradients are the reference's."""
    seen = []
    scan_bwd = tss.scan_bwd

    def recording(*args, **kw):
        seen.append((args[11] is None or not args[11].any(), args[12] is None))  # dout, dlast
        return scan_bwd(*args, **kw)
    monkeypatch.setattr(tss, "scan_bwd", recording)
    check_scan(*SMALL, 37, 16, torch.float32, seed=21, use=use)
    check_scan(*SMALL, 18, 16, torch.bfloat16, seed=22, use=use, drop=("initial_state",))
    assert seen == [(use == ("last",), use == ("out",))] * 2


def test_saved_bc_keeps_the_forward_packing_only_where_the_backward_reads_it():
    """A forward keeps its packed B and C for the backward only where the backward's config
    reads both in their packed dtypes; else the backward packs the rows again."""
    fwd = tss.scan_config(16)                                   # bf16 rows stay bf16
    bwd16, bwd64 = tss.scan_config(16, backward=True), tss.scan_config(64, backward=True)
    rows = {dt: torch.randn(2, 16, 9).to(dt) for dt in (torch.bfloat16, torch.float32)}
    for b_dt, c_dt, cfg_b, kept in [
            (torch.bfloat16, torch.bfloat16, bwd16, False),    # the 168 cap reads fp32
            (torch.float32, torch.float32, bwd16, True),       # packed fp32 already
            (torch.float32, torch.bfloat16, bwd16, False),     # C packed bf16: packed again
            (torch.bfloat16, torch.float32, bwd16, False),
            (torch.bfloat16, torch.bfloat16, bwd64, True)]:    # N=64 reads bf16
        B, C = rows[b_dt], rows[c_dt]
        Bp, Cp = tss.pack_bc(B, fwd), tss.pack_bc(C, fwd)
        assert (tss.saved_bc(Bp, Cp, B, C, cfg_b)[0] is Bp) == kept, (b_dt, c_dt)


@pytest.mark.parametrize("nstate,bwd_dtype", [(16, torch.float32), (64, torch.bfloat16)])
def test_scan_backward_reads_b_and_c_in_its_own_dtype(nstate, bwd_dtype, monkeypatch):
    """bf16 inputs: the forward packs B and C in bf16; the backward reads them in its config's
    dtype (fp32 at N=16, packed again from the saved rows: no conversions in its loop; bf16 at
    N=64, the forward's packing, not packed twice). Gradients are the reference's either way."""
    assert tss.bc_dtype(tss.backward_config(nstate, *SMALL, torch.device(DEVICE)), torch.bfloat16) == bwd_dtype
    packs, seen = [], []
    pack_bc, scan_bwd = tss.pack_bc, tss.scan_bwd

    def recording_pack(x, cfg):
        packs.append(tss.bc_dtype(cfg, x.dtype))
        return pack_bc(x, cfg)

    def recording_bwd(*args, **kw):
        seen.append((args[3].dtype, args[4].dtype))
        return scan_bwd(*args, **kw)
    monkeypatch.setattr(tss, "pack_bc", recording_pack)
    monkeypatch.setattr(tss, "scan_bwd", recording_bwd)
    check_scan(*SMALL, 37, nstate, torch.bfloat16, seed=25)
    assert seen == [(bwd_dtype, bwd_dtype)]
    assert packs == [torch.bfloat16] * 2 + ([bwd_dtype] * 2 if bwd_dtype != torch.bfloat16 else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_b_and_c_rows_of_one_tensor(dtype):
    """B and C as rows of one tensor (the mixer's x_proj output) are packed and their gradients
    unpacked by one copy each way (`stack_bc`): same results and gradients."""
    x = make_inputs(2, 3, 9, 16, dtype, seed=0)
    B, C = stack_rows(x["B"], x["C"])
    BC = tss.stack_bc(B, C)
    assert BC is not None and torch.equal(BC[0], B) and torch.equal(BC[1], C)
    assert tss.stack_bc(C, B) is None and tss.stack_bc(x["B"], x["C"]) is None
    cfg = tss.scan_config(16)
    for P, Q in zip(tss.pack_bc_pair(B, C, cfg), (tss.pack_bc(B, cfg), tss.pack_bc(C, cfg))):
        assert torch.equal(P, Q)
    check_scan(*SMALL, 37, 16, dtype, seed=23, layout=dict(u="cm1", delta="cm1", z="cm2", BC="stacked"))
    check_scan(*SMALL, 18, 8, dtype, seed=24, layout=dict(BC="stacked"), use=("out",))


def test_scan_channel_major_in_segments(monkeypatch):
    override_scan_config(monkeypatch, SEG=3)
    check_scan(*SMALL, 90, 8, torch.float32, seed=12, layout=dict(u="cm1", delta="cm1", z="cm2"))


def test_scan_reads_channel_major_storage_without_copies():
    """The output keeps u's channel-major strides: the kernels read u, delta and z in place."""
    x = make_inputs(2, 6, 20, 4, torch.float32, seed=13)
    for name, kind in (("u", "cm1"), ("delta", "cm1"), ("z", "cm2")):
        x[name] = arrange(x[name], kind)
    out = tss.selective_scan_triton(**x, delta_softplus=True)
    assert out.stride() == x["u"].stride() == (20, 40, 1)


def test_scan_empty_sequence():
    x = make_inputs(2, 3, 0, 4, torch.float32, seed=5)
    out, last = tss.selective_scan_triton(**x, delta_softplus=True, return_final_state=True)
    assert out.shape == (2, 3, 0) and torch.equal(last, x["initial_state"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nstate", [1, 16, 64])
@pytest.mark.parametrize("full", [True, False], ids=["z_D_bias", "bare"])
def test_state_update_matches_reference(nstate, full, dtype):
    batch, dim = (3, 300) if CUDA else (3, 70)
    x = make_inputs(batch, dim, 1, nstate, dtype, seed=nstate + 10 * full)
    state = x["initial_state"]
    kw = dict(D=x["D"], z=x["z"][..., 0], dt_bias=x["delta_bias"]) if full else {}
    args = (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])
    state_ref = state.double()
    args64 = [a.double() for a in args]
    kw64 = {k: v.double() for k, v in kw.items()}
    out = tss.selective_state_update_triton(state, *args, **kw, dt_softplus=full)
    out_ref = selective_state_update_ref(state_ref, *args64, **kw64, dt_softplus=full)
    assert out.dtype == dtype
    assert rel_err(out, out_ref) < TOL[dtype][0]
    assert rel_err(state, state_ref) < 1e-5


def test_generation_continues_the_scan():
    """Scan a prompt, then step byte by byte: the same outputs as scanning everything."""
    x = make_inputs(2, 8, 12, 16, torch.float32, seed=11)
    whole = tss.selective_scan_triton(**x, delta_softplus=True)
    prompt = {k: (v[..., :9] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out, state = tss.selective_scan_triton(**prompt, delta_softplus=True, return_final_state=True)
    steps = [tss.selective_state_update_triton(
        state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t],
        D=x["D"], z=x["z"][..., t], dt_bias=x["delta_bias"], dt_softplus=True) for t in range(9, 12)]
    assert rel_err(torch.cat([out, torch.stack(steps, -1)], -1), whole) < 1e-5


@pytest.mark.parametrize("quads", [True, False], ids=["chunk_quads", "chunk_pairs"])
def test_scan_inference_chunk_quads(quads, monkeypatch):
    """The inference forward in chunk quads (quads: four chunks an iteration, 4T / KN steps a
    state lane: 4 at N=16 with 4 states a thread, 2 at N=64) or pairs: the reference's output
    and final state at every chunk count mod 4 (the first quad's warm-up chunk and up to three
    no-op chunks past the end, some of them past the packed B and C), whole and in pieces, with
    and without z, D, delta_bias."""
    override_scan_config(monkeypatch, quads=quads)
    for length, nstate in ((1, 16), (5, 64), (9, 16), (13, 16), (16, 64), (30, 16), (33, 64)):
        x = make_inputs(*SMALL, length, nstate, torch.bfloat16, seed=length + nstate)
        out, last = tss.selective_scan_triton(**x, delta_softplus=True, return_final_state=True)
        ref, ref_last = selective_scan_ref(**{k: v.double() for k, v in x.items()},
                                           delta_softplus=True, return_final_state=True)
        assert rel_err(out, ref) < TOL[torch.bfloat16][0], (length, nstate)
        assert rel_err(last, ref_last) < TOL[torch.float32][0], (length, nstate)
    x = make_inputs(*SMALL, 21, 16, torch.bfloat16, seed=5)
    x.update(z=None, D=None, delta_bias=None)
    ref = selective_scan_ref(**{k: v.double() if v is not None else None for k, v in x.items()})
    assert rel_err(tss.selective_scan_triton(**x), ref) < TOL[torch.bfloat16][0]
    # in pieces (5 + 5 + 4 chunks): a group runs on past its piece's end into the next one's
    # chunks (masked); the N=16 tile pinned to 4 states a thread (forward_config's choice too,
    # pinned so that this test does not hang on that rule), last: the overrides pile up
    for nstate, tile in ((64, {}), (16, dict(NPT=4, KN=4, LD=8))):
        override_scan_config(monkeypatch, quads=quads, SEG=3, **tile)
        x = make_inputs(*SMALL, 55, nstate, torch.bfloat16, seed=6 + nstate)
        out, last = tss.selective_scan_triton(**x, delta_softplus=True, return_final_state=True)
        ref, ref_last = selective_scan_ref(**{k: v.double() for k, v in x.items()},
                                           delta_softplus=True, return_final_state=True)
        assert rel_err(out, ref) < TOL[torch.bfloat16][0], nstate
        assert rel_err(last, ref_last) < TOL[torch.float32][0], nstate


@pytest.mark.parametrize("seg", [None, 3], ids=["whole", "in_pieces"])
def test_scan_training_forward_in_chunk_quads(seg, monkeypatch):
    """The training forward in chunk quads (quads_ckpt; N=16 with 4 states a thread): its
    checkpoints, read by the backward, give the reference's gradients at every chunk count
    mod 4 (a quad's chunks past the end store none), whole and in pieces."""
    tile = dict(NPT=4, KN=4, LD=8, quads_ckpt=True, **({} if seg is None else dict(SEG=seg)))
    override_scan_config(monkeypatch, **tile)
    for length in (5, 9, 13, 17, 30) if seg is None else (55,):  # 2, 3, 4, 5, 8 chunks
        check_scan(*SMALL, length, 16, torch.bfloat16, seed=40 + length, use=("out",),
                   drop=("initial_state",))
    check_scan(*SMALL, 14, 16, torch.float32, seed=41)


@pytest.mark.parametrize("pre_pairs,quads,nseg,pre_split", [
    (True, True, 3, 1), (True, True, 3, 3), (True, True, 3, 2), (True, False, 4, 1),
    (True, False, 3, 2), (False, True, 3, 2)])
def test_forward_pre_pass(pre_pairs, quads, nseg, pre_split, monkeypatch):
    """The forward's pre-pass (each sub-piece's end state from zero and its summed step sizes)
    in the main kernel's pair / quad loop (PRE) or one chunk at a time
    (`_scan_fwd_segment_kernel`): 150 steps, 38 chunks in 3 or 4 pieces, sub-pieces of 13, 5,
    7 or 10 chunks. With the warm-up chunk a sub-piece's walk is one chunk longer: 14 and 6
    chunks in quads and 11 in pairs run a group on past the sub-piece's end (masked), 8 in
    quads and pairs end on a whole group. The inference forward at N=16 (4 states a thread)
    and N=64, and the training forward (its checkpoints give the backward's gradients) at
    N=16."""
    for nstate, tile in ((64, {}), (16, dict(NPT=4, KN=4, LD=8))):  # (the overrides pile up)
        override_scan_config(monkeypatch, SEG=nseg, quads=quads, quads_ckpt=quads,
                             pre_pairs=pre_pairs, pre_split=pre_split, **tile)
        x = make_inputs(*SMALL, 150, nstate, torch.bfloat16, seed=50 + nstate + pre_split)
        out, last = tss.selective_scan_triton(**x, delta_softplus=True, return_final_state=True)
        ref, ref_last = selective_scan_ref(**{k: v.double() for k, v in x.items()},
                                           delta_softplus=True, return_final_state=True)
        assert rel_err(out, ref) < TOL[torch.bfloat16][0], nstate
        assert rel_err(last, ref_last) < TOL[torch.float32][0], nstate
    override_scan_config(monkeypatch, SEG=nseg, quads=quads, quads_ckpt=quads,
                         pre_pairs=pre_pairs, pre_split=pre_split, NPT=4, KN=4, LD=8)
    check_scan(*SMALL, 150, 16, torch.bfloat16, seed=60 + pre_split)


@pytest.mark.parametrize("pairs", [True, False], ids=["chunk_pairs", "one_chunk"])
def test_scan_chunk_pairs(pairs, monkeypatch):
    """Chunk pairs (pairs: the per-(step, channel) rows of two chunks loaded and stored
    together, state lane kn taking 2T / KN adjacent steps of the pair; the backward at N=16
    with 4 states a thread: 2 steps a lane, N=64: 1; the pipelined forward with one step a lane,
    bf16 at N=16 here (forward_config's 4 states a thread; quads off, else the forward groups
    four chunks) and N=64 without gradients) or a chunk
    at a time: both must give the reference's results, with odd and even chunk counts (the
    first pair's later chunk past the segment, or the forward's warm-up chunk: no-ops), whole
    and in pieces, with and without z, D, delta_bias, softplus, with and without gradients."""
    override_scan_config(monkeypatch, pairs=pairs, quads=False)
    check_scan(*SMALL, 33, 16, torch.bfloat16, seed=31)                       # 9 chunks
    check_scan(*SMALL, 30, 64, torch.float32, seed=32)                        # 8 chunks
    check_scan(*SMALL, 6, 16, torch.bfloat16, seed=33, drop=("z", "D", "delta_bias"), softplus=False)
    check_scan(*SMALL, 21, 16, torch.bfloat16, seed=34, drop=("initial_state",),
               layout=dict(u="cm1", delta="cm1", z="cm2"))
    for length, nstate in ((29, 16), (26, 64)):                               # no gradients
        x = make_inputs(*SMALL, length, nstate, torch.bfloat16, seed=37 + nstate)
        out = tss.selective_scan_triton(**x, delta_softplus=True)
        ref = selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
        assert rel_err(out, ref) < TOL[torch.bfloat16][0], (length, nstate)
    override_scan_config(monkeypatch, pairs=pairs, SEG=3)                     # 4 + 4 + 3, 3 + 3 + 2 chunks
    check_scan(*SMALL, 41, 16, torch.bfloat16, seed=35)
    check_scan(*SMALL, 30, 64, torch.bfloat16, seed=36, drop=("z",))
