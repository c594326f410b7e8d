"""Mamba-2's SSD scan: the chunked reference against the step-by-step one, the Triton kernels
against the reference (outputs and every gradient, fp32 and bf16, odd lengths and widths, the
mixer's strided layout), and the Mamba-2 mixer and model around them.

On a CUDA machine the kernels run compiled; without one, conftest.py sets TRITON_INTERPRET=1 and
the same tests run through Triton's interpreter.
"""

import pytest
import torch

from bytelm.models.lm import LM, ModelConfig
from bytelm.modules.mamba2 import Mamba2Mixer
from bytelm.ops import ssd
from bytelm.ops.triton import gated_norm as tgated, ssd as tssd

from kernel_checks import nan_empty, rel_err, round_bf16_like_the_gpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# norm-relative error by dtype: fp32 differs by summation order; bf16 by the roundings of the
# dot operands (dt x, the decayed scores, the state, dy) to bf16, as mamba_ssm's kernels do
# (against the reference in fp64)
TOL = {torch.float32: 5e-5, torch.bfloat16: 1e-2}
# the gradients of A, D and dt_bias are sums over every step of every row whose terms cancel:
# their relative error in fp32 is that of the terms times the cancellation
SUMMED = {"A": 10, "D": 10, "dt_bias": 10}
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test; bf16
    casts round to nearest even in the interpreter too, as on the GPU."""
    monkeypatch.setattr(tssd, "_empty", nan_empty)
    monkeypatch.setattr(tgated, "_empty", nan_empty)
    monkeypatch.setattr(tssd, "_empty_strided",
                        lambda *a, **kw: torch.empty_strided(*a, **kw).fill_(float("nan")))
    if not CUDA:
        round_bf16_like_the_gpu(monkeypatch.setattr)


def randn(*shape, seed=1, dtype=torch.float32, device=DEVICE):
    """Seeded: the tests' random numbers do not depend on which tests ran before (xdist)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(device, dtype)


def make_inputs(batch, length, heads, head_dim, groups, state, dtype=torch.float32, device="cpu",
                seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(x=rnd(batch, length, heads, head_dim), dt=rnd(batch, length, heads) - 1,
                A=-torch.rand(heads, generator=g, dtype=torch.float64) * 2 - 0.2,
                B=rnd(batch, length, groups, state), C=rnd(batch, length, groups, state),
                D=rnd(heads), z=rnd(batch, length, heads, head_dim), dt_bias=rnd(heads) * 0.5,
                initial_state=rnd(batch, heads, head_dim, state))
    act = ("x", "dt", "B", "C", "z")  # activations in the given dtype, parameters and state fp32
    return {k: v.to(device=device, dtype=dtype if k in act else
                    (torch.float64 if dtype == torch.float64 else torch.float32))
            for k, v in args.items()}


def run(fn, args, dout, dstate, softplus=True, final=True):
    """fn's outputs and the gradients of every floating input for (dout, dstate)."""
    leaves = {k: v.detach().requires_grad_(True) if v is not None else None for k, v in args.items()}
    res = fn(**leaves, dt_softplus=softplus, return_final_state=final)
    out, state = res if final else (res, None)
    loss = (out.double() * dout.double()).sum()
    if final:
        loss = loss + (state.double() * dstate.double()).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out.detach(), None if state is None else state.detach(), dict(zip(names, grads))


def ref64(**kw):
    """The chunked reference on fp64 copies of the inputs (the same values)."""
    kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in kw.items()}
    return ssd.ssd_ref(**kw)


def assert_close(got, want, tol, what=""):
    out, state, grads = got
    rout, rstate, rgrads = want
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert rel_err(out, rout) < tol, f"{what}: out {rel_err(out, rout):.2e}"
    if rstate is not None:
        assert rel_err(state, rstate) < tol, f"{what}: final state {rel_err(state, rstate):.2e}"
    assert grads.keys() == rgrads.keys()
    for k in grads:
        assert torch.isfinite(grads[k]).all(), f"{what}: non-finite d{k}"
        err = rel_err(grads[k], rgrads[k])
        assert err < tol * SUMMED.get(k, 1), f"{what}: d{k} relative error {err:.2e}"


# ---- the references --------------------------------------------------------------------------
@pytest.mark.parametrize("length, groups, chunk", [(1, 1, 16), (63, 2, 16), (130, 1, 64), (100, 2, 7)])
def test_chunked_reference_matches_naive(length, groups, chunk):
    args = make_inputs(2, length, 4, 6, groups, 5, torch.float64)
    dout = randn(2, length, 4, 6, dtype=torch.float64, device="cpu")
    dstate = randn(2, 4, 6, 5, seed=2, dtype=torch.float64, device="cpu")
    want = run(ssd.ssd_naive, args, dout, dstate)
    got = run(lambda **kw: ssd.ssd_ref(**kw, chunk_size=chunk), args, dout, dstate)
    assert_close(got, want, 1e-10, "ref vs naive")


def test_state_update_steps_match_naive():
    args = make_inputs(2, 9, 4, 6, 2, 5, torch.float64)
    want, want_state = ssd.ssd_naive(**args, dt_softplus=True, return_final_state=True)
    state = args["initial_state"].clone()
    outs = [ssd.ssd_state_update_ref(state, args["x"][:, t], args["dt"][:, t], args["A"],
                                     args["B"][:, t], args["C"][:, t], args["D"], args["z"][:, t],
                                     args["dt_bias"], dt_softplus=True) for t in range(9)]
    assert rel_err(torch.stack(outs, 1), want) < 1e-12
    assert rel_err(state, want_state) < 1e-12


def test_bad_shapes_are_one_line_errors():
    args = make_inputs(1, 8, 4, 6, 2, 5)
    with pytest.raises(ValueError, match="groups do not divide"):
        ssd.ssd_ref(**dict(args, B=args["B"].repeat(1, 1, 3, 1)[:, :, :3],
                           C=args["C"].repeat(1, 1, 3, 1)[:, :, :3]))
    with pytest.raises(ValueError, match="dt must be"):
        ssd.ssd_fn(**dict(args, dt=args["dt"][:, :4]), backend="triton")
    with pytest.raises(ValueError, match="unknown ssd backend"):
        ssd.ssd_fn(**args, backend="cuda")
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        ssd.ssd_ref(**dict(args, x=args["x"].long()))
    with pytest.raises(ValueError, match="must be fp32"):
        ssd.ssd_state_update_ref(args["initial_state"].bfloat16(), args["x"][:, 0], args["dt"][:, 0],
                                 args["A"], args["B"][:, 0], args["C"][:, 0])
    with pytest.raises(ValueError, match="B and C must be"):
        ssd.ssd_state_update_ref(args["initial_state"], args["x"][:, 0], args["dt"][:, 0],
                                 args["A"], args["B"][:, 0, 0], args["C"][:, 0, 0])
    with pytest.raises(ValueError, match="index with 32 bits"):  # shapes only: no memory
        tssd.check_offsets(torch.empty_strided((2, 2), (2**31, 1), device="meta"))


# ---- the Triton kernels ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, heads, head_dim, groups, state", [
    (2, 1, 4, 16, 2, 16),      # one step; two groups
    (1, 63, 2, 12, 1, 20),     # odd length, head_dim and state padded to the tiles
    (1, 200, 2, 64, 1, 32),    # four chunks of 64, the last partial; two slices of state cells
    (1, 70, 8, 16, 1, 16),     # 8 heads a group: dB and dC summed over the heads' programs
    (1, 75, 4, 16, 2, 16),     # two groups over two chunks
    # head_dim below a state of 64+: bf16 outputs were wrong and read out of bounds on the H200
    # (triton 3.6) until the head tile was widened (tile_sizes); the interpreter never showed it
    (2, 90, 4, 32, 1, 64),
    (1, 63, 2, 16, 2, 128),
])
def test_triton_matches_reference(batch, length, heads, head_dim, groups, state, dtype):
    args = make_inputs(batch, length, heads, head_dim, groups, state, dtype, DEVICE, seed=length)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(batch, length, heads, head_dim, generator=g).to(DEVICE, dtype)
    dstate = torch.randn(batch, heads, head_dim, state, generator=g).to(DEVICE)
    want = run(ref64, args, dout, dstate)
    got = run(tssd.ssd_triton, args, dout, dstate)
    assert_close(got, want, TOL[dtype], f"{dtype} L={length}")
    assert got[0].dtype == dtype and got[2]["dt"].dtype == dtype and got[2]["B"].dtype == dtype


def test_head_tile_is_64_wide_with_a_state_of_64_or_more():
    """The workaround above lives in tile_sizes; CPU CI cannot see the bug, so this pins it."""
    assert tssd.tile_sizes(32, 64) == (64, 64) and tssd.tile_sizes(16, 128) == (64, 128)
    assert tssd.tile_sizes(12, 20) == (16, 32) and tssd.tile_sizes(128, 64) == (128, 64)
    with pytest.raises(ValueError, match="head_dim 128 with d_state 256 makes a 128 x 256 tile"):
        tssd.tile_sizes(128, 256)
    with pytest.raises(ValueError, match="head_dim 16 with d_state 512 makes a 64 x 512 tile"):
        tssd.tile_sizes(16, 512)  # the widened head tile is what does not fit
    assert tssd.tile_sizes(64, 128, itemsize=4) == (64, 128)
    with pytest.raises(ValueError, match="in 4-byte elements"):
        tssd.tile_sizes(128, 128, itemsize=4)


@pytest.mark.skipif(not CUDA, reason="large tiles are slow in the interpreter; run on the GPU")
@pytest.mark.parametrize("head_dim, state, dtype", [
    (128, 128, torch.bfloat16), (64, 256, torch.bfloat16), (128, 16, torch.bfloat16),
    (64, 128, torch.float32), (128, 64, torch.float32)])
def test_triton_large_tiles(head_dim, state, dtype):
    """The largest tiles the kernels take in each dtype (tile_sizes' byte bound), and a wide
    head with a narrow state."""
    args = make_inputs(2, 150, 2, head_dim, 1, state, dtype, DEVICE, seed=3)
    dout = randn(2, 150, 2, head_dim, dtype=dtype)
    dstate = randn(2, 2, head_dim, state, seed=2)
    assert_close(run(tssd.ssd_triton, args, dout, dstate), run(ref64, args, dout, dstate),
                 TOL[dtype], f"{head_dim} x {state}")


@pytest.mark.skipif(not CUDA, reason="a long sequence is slow in the interpreter; fp32 1000 steps on the GPU")
def test_triton_long_sequence():
    args = make_inputs(2, 1000, 4, 64, 1, 64, torch.float32, DEVICE)
    dout = randn(2, 1000, 4, 64)
    dstate = randn(2, 4, 64, 64, seed=2)
    assert_close(run(tssd.ssd_triton, args, dout, dstate), run(ref64, args, dout, dstate),
                 TOL[torch.float32], "L=1000")


@pytest.mark.parametrize("cfg, groups, dtype", [
    (dict(T=16, num_warps=4, HB=1), 1, torch.float32), (dict(T=32, num_warps=2, HB=2), 1, torch.float32),
    (dict(T=64, num_warps=4, HB=6), 1, torch.float32), (dict(T=32, num_warps=4, HB=3), 2, torch.bfloat16)])
def test_triton_launch_configs(cfg, groups, dtype):
    """Chunk lengths and heads a program (HB) other than the defaults give the same results."""
    args = make_inputs(2, 45, 6, 16, groups, 16, dtype, DEVICE, seed=7)
    x, dt, A, B, C, D, z, bias, h0 = (args[k] for k in NAMES)
    dout = randn(2, 45, 6, 16, dtype=dtype)
    out, hT, states, decay = tssd.ssd_fwd(x, dt, A, B, C, D, z, bias, True, h0, cfg=cfg)
    assert states.dtype == dtype  # saved for the backward in the dot operands' dtype
    grads = tssd.ssd_bwd(x, dt, A, B, C, D, z, bias, True, states, decay, dout, None, cfg=cfg)
    want = run(ref64, args, dout, torch.zeros_like(hT))
    assert rel_err(out, want[0]) < TOL[dtype] and rel_err(hT, want[1]) < TOL[dtype]
    for name, got in zip(NAMES, grads):
        assert rel_err(got, want[2][name]) < TOL[dtype] * SUMMED.get(name, 1), name


@pytest.mark.parametrize("dtype, groups", [(torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 2)])
def test_xbc_op_writes_gradients_in_the_inputs_layout(dtype, groups):
    """ssd_xbc_fn: x, B, C read from one channel-major conv output (the mixer's layout, over two
    chunks, with an initial state); its gradient comes back as one tensor in that layout, and
    z's and dt's in theirs (the rows come back contiguous)."""
    batch, length, heads, p, n = 2, 90, 4, 32, 64
    g = torch.Generator().manual_seed(2)
    width = heads * p + 2 * groups * n
    rows = torch.randn(width + heads * p + heads, batch, length, generator=g).to(DEVICE, dtype)
    xbc_rows, z_rows, dt_rows = rows.split([width, heads * p, heads])
    leaves = [t.detach().clone().requires_grad_() for t in (xbc_rows, z_rows, dt_rows)]
    args = make_inputs(batch, length, heads, p, groups, n, torch.float32, DEVICE)
    h0 = args["initial_state"].requires_grad_()
    outs = []
    for backend in ("ref", "triton"):
        xbc, z, dt = (t.permute(1, 2, 0) for t in leaves)
        y, hT = ssd.ssd_xbc_fn(xbc, dt - 1, args["A"], args["D"], z.unflatten(-1, (heads, p)),
                               args["dt_bias"], True, p, groups, n, initial_state=h0,
                               return_final_state=True, backend=backend)
        grads = torch.autograd.grad(y.float().square().sum() + hT.sum(), leaves + [h0])
        outs.append((y, hT, grads))
    for want, got in zip(outs[0][2], outs[1][2]):
        assert got.is_contiguous() and rel_err(got, want) < TOL[dtype]
    assert rel_err(outs[1][0], outs[0][0]) < TOL[dtype] and rel_err(outs[1][1], outs[0][1]) < TOL[dtype]


def test_unused_outputs_send_no_gradient():
    """Only the final state in the loss (the output's gradient arrives as None), then only the
    output (the final state's): the kernels' gradients still match the reference's."""
    args = make_inputs(1, 70, 2, 16, 1, 16, torch.float32, DEVICE, seed=9)
    for pick in (1, 0):
        got, want = [], []
        for fn, acc in ((tssd.ssd_triton, got), (ref64, want)):
            leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
            res = fn(**leaves, dt_softplus=True, return_final_state=True)
            grads = torch.autograd.grad(res[pick].double().sum(), list(leaves.values()),
                                        allow_unused=True)  # C, D, z do not reach the state
            acc.extend(torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves.values()))
        for name, a, b in zip(NAMES, got, want):
            tol = TOL[torch.float32] * SUMMED.get(name, 1)
            assert torch.isfinite(a).all() and rel_err(a, b, scale=max(b.norm(), 1.0)) < tol, (pick, name)


@pytest.mark.parametrize("drop", ["z", "D", "dt_bias", "initial_state", "softplus", "final"])
def test_triton_optional_inputs(drop):
    args = make_inputs(1, 70, 2, 16, 1, 16, torch.float32, DEVICE, seed=3)
    if drop in args:
        args[drop] = None
    softplus, final = drop != "softplus", drop != "final"
    if not softplus:  # raw dt must be positive
        args["dt"] = args["dt"].abs() * 0.1
    dout = randn(1, 70, 2, 16)
    dstate = randn(1, 2, 16, 16, seed=2)
    assert_close(run(tssd.ssd_triton, args, dout, dstate, softplus, final),
                 run(ref64, args, dout, dstate, softplus, final), TOL[torch.float32], drop)


def test_triton_reads_the_mixers_strided_layout():
    """x, B, C as column slices of one conv output and z, dt of one projection, the way the
    Mamba-2 mixer passes them; the upstream gradient strided too."""
    batch, length, heads, p, n = 2, 70, 2, 16, 16
    g = torch.Generator().manual_seed(5)
    xbc = torch.randn(batch, heads * p + 2 * n, length, generator=g).to(DEVICE).transpose(1, 2)
    zdt = torch.randn(batch, length, heads * p + heads + 3, generator=g).to(DEVICE)
    x, B, C = xbc.split([heads * p, n, n], dim=-1)
    args = make_inputs(batch, length, heads, p, 1, n, torch.float32, DEVICE)
    args.update(x=x.unflatten(-1, (heads, p)), B=B.unflatten(-1, (1, n)), C=C.unflatten(-1, (1, n)),
                z=zdt[..., :heads * p].unflatten(-1, (heads, p)), dt=zdt[..., heads * p:heads * p + heads])
    assert not args["x"].is_contiguous() and args["x"].stride(1) == 1
    dout = torch.randn(batch, heads, p, length, generator=g).to(DEVICE).permute(0, 3, 1, 2)
    dstate = torch.randn(batch, heads, p, n, generator=g).to(DEVICE)
    assert_close(run(tssd.ssd_triton, args, dout, dstate), run(ref64, args, dout, dstate),
                 TOL[torch.float32], "strided")


def test_triton_without_autograd_matches_and_refuses_double_backward():
    args = make_inputs(1, 40, 2, 16, 1, 16, torch.float32, DEVICE)
    with torch.no_grad():
        out, state = tssd.ssd_triton(**args, dt_softplus=True, return_final_state=True)
    rout, rstate = ssd.ssd_ref(**args, dt_softplus=True, return_final_state=True)
    assert rel_err(out, rout) < TOL[torch.float32] and rel_err(state, rstate) < TOL[torch.float32]
    x = args.pop("x").requires_grad_()
    y = tssd.ssd_triton(x, **args, dt_softplus=True)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


@pytest.mark.parametrize("dtype, groups", [(torch.float32, 1), (torch.bfloat16, 2)])
def test_mamba2_inner_matches_the_separate_ops_with_one_gradient_buffer(dtype, groups):
    """The mixer's conv + scan + gated norm node (mamba2_inner) against the conv, scan and norm
    ops it replaces; the gradient of in_proj's channel-major rows comes back as one buffer in
    their layout (every row written: the buffers start as NaN)."""
    from bytelm.ops.causal_conv1d import causal_conv1d_fn
    from bytelm.ops.rms_norm import gated_rms_norm_fn
    from bytelm.ops.triton.mamba2_inner import mamba2_inner_triton
    batch, length, heads, head_dim, state = 2, 70, 4, 16, 16
    d_inner, conv_dim = heads * head_dim, heads * head_dim + 2 * groups * state
    z = randn(batch * length, d_inner, seed=2, dtype=dtype)
    xbcdt = randn(conv_dim + heads, batch * length, seed=3, dtype=dtype)
    w, bias = randn(conv_dim, 1, 4, seed=4) * 0.5, randn(conv_dim, seed=5)
    A, D, dt_bias = -torch.rand(heads, device=DEVICE) - 0.5, randn(heads, seed=6), randn(heads, seed=7)
    norm_w = 1 + 0.3 * randn(d_inner, seed=9)
    leaves = [t.requires_grad_() for t in (z, xbcdt, w, bias, A, D, dt_bias, norm_w)]
    dout = randn(batch, length, d_inner, seed=8, dtype=dtype)

    def separate(z, xbcdt, w, bias, A, D, dt_bias, norm_w):
        xbc_in, dt = ssd.split_xbcdt(xbcdt, batch, length, heads)
        xbc = causal_conv1d_fn(xbc_in.transpose(1, 2), w, bias, activation="silu", backend="triton")
        y = ssd.ssd_xbc_fn(xbc.transpose(1, 2), dt, A, D=D, dt_bias=dt_bias, dt_softplus=True,
                           head_dim=head_dim, n_groups=groups, d_state=state, backend="triton")
        return gated_rms_norm_fn(y.flatten(-2), z.view(batch, length, d_inner), norm_w, 1e-5,
                                 groups, backend="triton")

    def fused(*args):
        return mamba2_inner_triton(*args[:7], args[7], 1e-5, batch, head_dim, groups, state)

    got, want = [(y := f(*leaves), torch.autograd.grad((y.float() * dout.float()).sum(), leaves))
                 for f in (fused, separate)]
    assert got[0].shape == (batch, length, d_inner)
    assert got[0].dtype == dtype and rel_err(got[0], want[0]) < TOL[dtype]
    names = ("z", "xbcdt", "w", "bias", "A", "D", "dt_bias", "norm_w")
    for name, g, r in zip(names, got[1], want[1]):
        assert torch.isfinite(g).all() and rel_err(g, r) < TOL[dtype] * SUMMED.get(name, 1), name
    assert got[1][1].stride() == xbcdt.stride()


def test_mamba2_inner_optional_inputs_and_errors():
    """Without D, dt_bias or the conv bias the node returns no gradient for them; positions that
    are not whole rows, no positions, z not in rows, a conv too wide for the kernels and a norm
    weight of the wrong width are one-line errors."""
    from bytelm.ops.triton.mamba2_inner import mamba2_inner_triton
    batch, length, heads, head_dim, state = 1, 20, 2, 16, 16
    d_inner, conv_dim = heads * head_dim, heads * head_dim + 2 * state
    z = randn(batch * length, d_inner, seed=2).requires_grad_()
    xbcdt = randn(conv_dim + heads, batch * length, seed=3).requires_grad_()
    w, A = randn(conv_dim, 1, 4, seed=4).requires_grad_(), -torch.rand(heads, device=DEVICE) - 0.5
    norm_w = torch.ones(d_inner, device=DEVICE)
    y = mamba2_inner_triton(z, xbcdt, w, None, A, None, None, norm_w, 1e-5, batch, head_dim, 1, state)
    grads = torch.autograd.grad(y.square().sum(), (z, xbcdt, w))
    assert all(torch.isfinite(g).all() for g in grads)
    args = (None, A, None, None, norm_w, 1e-5)
    with pytest.raises(ValueError, match="19 positions are not 2 rows"):
        mamba2_inner_triton(z[:19], xbcdt[:, :19], w, *args, 2, head_dim, 1, state)
    with pytest.raises(ValueError, match="0 positions are not 1 rows"):
        mamba2_inner_triton(z[:0], xbcdt[:, :0], w, *args, 1, head_dim, 1, state)
    with pytest.raises(ValueError, match=r"z must be \(20, 32\) rows with unit column stride"):
        mamba2_inner_triton(z.t().contiguous().t(), xbcdt, w, *args, 1, head_dim, 1, state)
    with pytest.raises(ValueError, match="width <= 8, got 9"):
        mamba2_inner_triton(z, xbcdt, randn(conv_dim, 1, 9), *args, 1, head_dim, 1, state)
    with pytest.raises(ValueError, match=r"gated_rms_norm: weight of shape \(31,\) for rows of 32"):
        mamba2_inner_triton(z, xbcdt, w, None, A, None, None, norm_w[:31], 1e-5, 1, head_dim, 1, state)


# ---- the mixer and the model -----------------------------------------------------------------
def _mixer_pair(n_groups=1):
    torch.manual_seed(0)
    ref = Mamba2Mixer(32, d_state=16, head_dim=16, n_groups=n_groups, scan_backend="ref").to(DEVICE)
    fused = Mamba2Mixer(32, d_state=16, head_dim=16, n_groups=n_groups,
                        scan_backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mixer_triton_matches_reference_with_gradients(n_groups):
    ref, fused = _mixer_pair(n_groups)
    hidden = randn(2, 67, 32)
    outs = []
    for m in (ref, fused):
        m.zero_grad()
        out = m(hidden)
        out.square().sum().backward()
        outs.append((out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    assert rel_err(outs[1][0], outs[0][0]) < TOL[torch.float32]
    for k, g in outs[0][1].items():
        assert rel_err(outs[1][1][k], g) < TOL[torch.float32], k


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("batch, length", [(2, 0), (0, 5)])
def test_mixer_takes_an_empty_batch_or_length(backend, batch, length):
    _, fused = _mixer_pair()
    mixer = fused if backend == "triton" else _mixer_pair()[0]
    hidden = randn(batch, length, 32).requires_grad_()
    out = mixer(hidden)
    out.sum().backward()
    assert out.shape == (batch, length, 32) and hidden.grad.shape == hidden.shape


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("prompt", [2, 70])  # shorter than the conv; across a chunk of 64
def test_mamba2_prefill_then_steps_match_the_parallel_forward(backend, prompt):
    torch.manual_seed(0)
    model = LM(ModelConfig(d_model=32, n_layer=2, layer_pattern="SA", n_head=2, d_state=16,
                           head_dim=16, scan_backend=backend)).to(DEVICE).eval()
    ids = torch.randint(0, 256, (2, prompt + 6), device=DEVICE)
    with torch.no_grad():
        full = model(ids)
        logits, states = model.prefill(ids[:, :prompt])
        assert rel_err(logits, full[:, prompt - 1]) < 1e-5
        for t in range(prompt, prompt + 6):
            assert rel_err(model.step(ids[:, t], states), full[:, t]) < 1e-5, t


def test_mamba2_bf16_autocast_forward_matches_the_reference():
    """Several heads of 32, state 64, three chunks (the last partial), bf16 under autocast: the
    shape at which a review saw an illegal memory access on the H200 (nineteenth session)."""
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_layer=2, layer_pattern="S", d_state=64, head_dim=32)
    ref = LM(ModelConfig(**cfg, scan_backend="ref")).to(DEVICE).eval()
    fused = LM(ModelConfig(**cfg, scan_backend="triton")).to(DEVICE).eval()
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 150), device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        want, got = ref(ids).float(), fused(ids).float()
    assert torch.isfinite(got).all() and rel_err(got, want) < 2e-2  # two layers of bf16 matmuls


def test_grouped_gated_norm_normalises_each_group():
    """With n_groups > 1 the gated RMSNorm runs over each group's channels (mamba_ssm's
    RMSNormGated), not over all of d_inner, and the gate comes before the norm."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, d_state=16, head_dim=16, n_groups=2, scan_backend="ref")
    with torch.no_grad():
        mixer.norm_weight.uniform_(0.5, 1.5)
        y = randn(3, 64, device="cpu") * torch.cat([torch.full((32,), 5.0), torch.ones(32)])
        z = randn(3, 64, seed=2, device="cpu")
        g = y * torch.nn.functional.silu(z)
        halves = [h * torch.rsqrt(h.square().mean(-1, keepdim=True) + mixer.norm_eps) for h in g.split(32, -1)]
        want = mixer.out_proj(torch.cat(halves, -1) * mixer.norm_weight)
        whole = mixer.out_proj(g * torch.rsqrt(g.square().mean(-1, keepdim=True) + mixer.norm_eps)
                               * mixer.norm_weight)
        got = mixer._out(y, z)
    torch.testing.assert_close(got, want)
    assert rel_err(got, whole) > 0.1  # the whole-width norm is a different model


@pytest.mark.parametrize("field, value, message", [
    ("head_dim", 48, "head_dim 48 must divide"),
    ("n_groups", 3, "n_groups 3 must divide"),
])
def test_mamba2_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        LM(ModelConfig(**{"d_model": 64, "n_layer": 1, "layer_pattern": "S", "head_dim": 32,
                          field: value}))


def test_mamba2_tile_that_cannot_fit_fails_at_construction():
    """On the Triton backend a head x state tile past the kernels' shared memory is a one-line
    error when the model is built; the reference backend takes any size."""
    cfg = {"d_model": 64, "n_layer": 1, "layer_pattern": "S", "head_dim": 128, "d_state": 256}
    with pytest.raises(ValueError, match="makes a 128 x 256 tile"):
        LM(ModelConfig(**cfg, scan_backend="triton"))
    LM(ModelConfig(**cfg, scan_backend="ref"))


def test_mamba2_counts_its_flops_and_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, layer_pattern="S", d_state=16, head_dim=16,
                      scan_backend="ref")
    model = LM(cfg)
    mixer = model.layers[0].mixer
    cells = mixer.n_heads * mixer.head_dim * mixer.d_state
    assert model.flops_per_token() == model.matmul_flops_per_token() + 2 * (
        2 * mixer.conv_dim * 4 + 5 * cells + 6 * mixer.d_inner)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 16, (4, 33))  # a small alphabet: learnable in a few steps
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
