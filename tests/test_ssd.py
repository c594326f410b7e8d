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
from bytelm.ops.triton import ssd as tssd

from kernel_checks import nan_empty, rel_err, round_bf16_like_the_gpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# norm-relative error by dtype: fp32 differs by summation order; bf16 by the roundings of the
# dot operands (dt x, the decayed scores, the state, dy) to bf16, as mamba_ssm's kernels do
# (against the reference in fp64; dA and dt_bias's gradients sum every step of every row)
TOL = {torch.float32: 5e-5, torch.bfloat16: 2.5e-2}
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test; bf16
    casts round to nearest even in the interpreter too, as on the GPU."""
    monkeypatch.setattr(tssd, "_empty", nan_empty)
    if not CUDA:
        round_bf16_like_the_gpu(monkeypatch.setattr)


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
        assert err < tol, f"{what}: d{k} relative error {err:.2e}"


# ---- the references --------------------------------------------------------------------------
@pytest.mark.parametrize("length, groups, chunk", [(1, 1, 16), (63, 2, 16), (130, 1, 64), (100, 2, 7)])
def test_chunked_reference_matches_naive(length, groups, chunk):
    args = make_inputs(2, length, 4, 6, groups, 5, torch.float64)
    dout = torch.randn(2, length, 4, 6, dtype=torch.float64)
    dstate = torch.randn(2, 4, 6, 5, dtype=torch.float64)
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


# ---- the Triton kernels ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, heads, head_dim, groups, state", [
    (2, 1, 4, 16, 2, 16),      # one step; two groups
    (1, 63, 2, 12, 1, 20),     # odd length, head_dim and state padded to the tiles
    (1, 200, 2, 64, 1, 32),    # four chunks of 64, the last partial; two slices of state cells
    (1, 70, 8, 16, 1, 16),     # 8 heads a group: dB and dC summed over the heads' programs
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


@pytest.mark.skipif(not CUDA, reason="a long sequence is slow in the interpreter; fp32 1000 steps on the GPU")
def test_triton_long_sequence():
    args = make_inputs(2, 1000, 4, 64, 1, 64, torch.float32, DEVICE)
    dout = torch.randn(2, 1000, 4, 64, device=DEVICE)
    dstate = torch.randn(2, 4, 64, 64, device=DEVICE)
    assert_close(run(tssd.ssd_triton, args, dout, dstate), run(ref64, args, dout, dstate),
                 TOL[torch.float32], "L=1000")


@pytest.mark.parametrize("cfg", [dict(T=16, num_warps=4, HB=1), dict(T=32, num_warps=2, HB=2),
                                 dict(T=64, num_warps=4, HB=6)])
def test_triton_launch_configs(cfg):
    """Chunk lengths and heads a program (HB) other than the defaults give the same results."""
    args = make_inputs(2, 45, 6, 16, 1, 16, torch.float32, DEVICE, seed=7)
    x, dt, A, B, C, D, z, bias, h0 = (args[k] for k in NAMES)
    dout = torch.randn(2, 45, 6, 16, device=DEVICE)
    out, hT, states, decay = tssd.ssd_fwd(x, dt, A, B, C, D, z, bias, True, h0, cfg=cfg)
    grads = tssd.ssd_bwd(x, dt, A, B, C, D, z, bias, True, states, decay, dout, None, cfg=cfg)
    want = run(ref64, args, dout, torch.zeros_like(hT))
    assert rel_err(out, want[0]) < TOL[torch.float32] and rel_err(hT, want[1]) < TOL[torch.float32]
    for name, got in zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"), grads):
        assert rel_err(got, want[2][name]) < TOL[torch.float32], name


def test_xbc_op_writes_gradients_in_the_inputs_layout():
    """ssd_xbc_fn: x, B, C read from one channel-major conv output; its gradient comes back as one
    tensor in that layout, and z's and dt's in theirs (the rows come back contiguous)."""
    batch, length, heads, p, n = 2, 50, 4, 16, 16
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(heads * p + 2 * n + heads * p + heads, batch, length, generator=g).to(DEVICE)
    xbc_rows, z_rows, dt_rows = rows.split([heads * p + 2 * n, heads * p, heads])
    leaves = [t.detach().clone().requires_grad_() for t in (xbc_rows, z_rows, dt_rows)]
    args = make_inputs(batch, length, heads, p, 1, n, torch.float32, DEVICE)
    outs = []
    for backend in ("ref", "triton"):
        xbc, z, dt = (t.permute(1, 2, 0) for t in leaves)
        y, hT = ssd.ssd_xbc_fn(xbc, dt - 1, args["A"], args["D"], z.unflatten(-1, (heads, p)),
                               args["dt_bias"], True, p, 1, n, return_final_state=True,
                               backend=backend)
        grads = torch.autograd.grad(y.square().sum() + hT.sum(), leaves)
        outs.append((y, hT, grads))
    for want, got in zip(outs[0][2], outs[1][2]):
        assert got.is_contiguous() and rel_err(got, want) < TOL[torch.float32]
    assert rel_err(outs[1][0], outs[0][0]) < TOL[torch.float32]


@pytest.mark.parametrize("drop", ["z", "D", "dt_bias", "initial_state", "softplus", "final"])
def test_triton_optional_inputs(drop):
    args = make_inputs(1, 70, 2, 16, 1, 16, torch.float32, DEVICE, seed=3)
    if drop in args:
        args[drop] = None
    softplus, final = drop != "softplus", drop != "final"
    if not softplus:  # raw dt must be positive
        args["dt"] = args["dt"].abs() * 0.1
    dout = torch.randn(1, 70, 2, 16, device=DEVICE)
    dstate = torch.randn(1, 2, 16, 16, device=DEVICE)
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
    with pytest.raises(RuntimeError):
        dx.sum().backward()


# ---- the mixer and the model -----------------------------------------------------------------
def _mixer_pair():
    torch.manual_seed(0)
    ref = Mamba2Mixer(32, d_state=16, head_dim=16, scan_backend="ref").to(DEVICE)
    fused = Mamba2Mixer(32, d_state=16, head_dim=16, scan_backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_mixer_triton_matches_reference_with_gradients():
    ref, fused = _mixer_pair()
    hidden = torch.randn(2, 67, 32, device=DEVICE)
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
def test_mamba2_prefill_then_steps_match_the_parallel_forward(backend):
    torch.manual_seed(0)
    model = LM(ModelConfig(d_model=32, n_layer=2, layer_pattern="SA", n_head=2, d_state=16,
                           head_dim=16, scan_backend=backend)).to(DEVICE).eval()
    ids = torch.randint(0, 256, (2, 30), device=DEVICE)
    with torch.no_grad():
        full = model(ids)
        logits, states = model.prefill(ids[:, :20])
        assert rel_err(logits, full[:, 19]) < 1e-5
        for t in range(20, 30):
            assert rel_err(model.step(ids[:, t], states), full[:, t]) < 1e-5, t


@pytest.mark.parametrize("field, value, message", [
    ("head_dim", 48, "head_dim 48 must divide"),
    ("n_groups", 3, "n_groups 3 must divide"),
])
def test_mamba2_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        LM(ModelConfig(**{"d_model": 64, "n_layer": 1, "layer_pattern": "S", "head_dim": 32,
                          field: value}))


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
