"""The fused Triton gated RMSNorm (the Mamba-2 mixer's norm) against its reference: outputs and
the gradients of y, z and weight, with z as rows (the mixer's layout) and as a channel-major
view (any strides are correct, if slower).

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter.
The reference is checked against an independent float64 computation.
"""

import pytest
import torch
import torch.nn.functional as F

from bytelm.ops.rms_norm import gated_rms_norm_fn, gated_rms_norm_ref
from bytelm.ops.triton import gated_norm as tgn

from kernel_checks import nan_empty, rel_err, round_bf16_like_the_gpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test."""
    monkeypatch.setattr(tgn, "_empty", nan_empty)
    if not CUDA:
        round_bf16_like_the_gpu(monkeypatch.setattr)


def make_inputs(rows, dim, dtype, seed, channel_major=False):
    """y, z (rows, dim) in dtype (z a transposed view of (dim, rows) storage if channel_major),
    weight (dim,) fp32 around 1, dout like y."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(rows, dim, generator=g) * 2).to(DEVICE, dtype)
    z = torch.randn(dim, rows, generator=g).to(DEVICE, dtype)
    z = z.t() if channel_major else z.t().contiguous()
    w = (1 + 0.5 * torch.randn(dim, generator=g)).to(DEVICE)
    dout = torch.randn(rows, dim, generator=g).to(DEVICE, dtype)
    return y, z, w, dout


def outputs_and_grads(fn, y, z, w, dout, groups):
    leaves = [t.detach().requires_grad_() for t in (y, z, w)]
    out = fn(*leaves, EPS, groups)
    return (out, *torch.autograd.grad(out, leaves, dout))


def test_reference_matches_float64_by_hand():
    y, z, w, _ = make_inputs(5, 12, torch.float32, 0)
    g = (y.double() * z.double() * torch.sigmoid(z.double())).view(5, 3, 4)
    want = (g / (g.square().mean(-1, keepdim=True) + EPS).sqrt()).view(5, 12) * w.double()
    assert rel_err(gated_rms_norm_ref(y, z, w, EPS, groups=3), want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, dim, groups", [(1, 64, 1), (63, 96, 3), (1000, 48, 1), (70, 40, 2)])
@pytest.mark.parametrize("channel_major", [False, True])
def test_triton_matches_reference(rows, dim, groups, dtype, channel_major):
    if rows == 1000 and not (CUDA or channel_major):
        pytest.skip("one layout of the long case is enough in the interpreter")
    y, z, w, dout = make_inputs(rows, dim, dtype, seed=rows + dim, channel_major=channel_major)
    got = outputs_and_grads(lambda *a: gated_rms_norm_fn(*a, backend="triton"), y, z, w, dout, groups)
    # the reference in fp64: the kernels' fp32 arithmetic on the same (rounded) inputs
    want = outputs_and_grads(gated_rms_norm_ref, y.double(), z.double(), w.double(), dout.double(),
                             groups)
    for name, a, b in zip(("out", "dy", "dz", "dw"), got, want):
        assert torch.isfinite(a).all(), name
        assert a.shape == b.shape, name
        tol = TOL[dtype] if name != "dw" else TOL[torch.float32] * 10  # dw: an fp32 sum
        assert rel_err(a, b) < tol, f"{name}: {rel_err(a, b):.2e}"
    assert got[0].dtype == got[1].dtype == dtype and got[3].dtype == w.dtype


def test_backward_writes_into_given_strided_buffers():
    """dz given as a strided view into a larger buffer: every element lands there (the buffer
    starts as NaN), nothing outside it is touched."""
    rows, dim = 37, 48
    y, z, w, dout = make_inputs(rows, dim, torch.float32, 1, channel_major=True)
    out, rstd = tgn.gated_norm_fwd(y, z, w, EPS)
    buf = torch.full((dim + 2, rows), float("nan"), device=DEVICE)
    buf[-2:] = 7.0
    dz = buf[:dim].t()
    dy, dz_ret, dw = tgn.gated_norm_bwd(y, z, w, rstd, dout, dz=dz)
    assert dz_ret.data_ptr() == buf.data_ptr() and (buf[-2:] == 7.0).all()
    want = outputs_and_grads(gated_rms_norm_ref, y.double(), z.double(), w.double(), dout.double(), 1)
    assert rel_err(out, want[0]) < 1e-5
    for got, ref in ((dy, want[1]), (dz, want[2]), (dw, want[3])):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 1e-5


def test_no_grad_forward_and_weight_without_gradient():
    y, z, w, dout = make_inputs(9, 32, torch.float32, 2)
    with torch.no_grad():
        out = gated_rms_norm_fn(y, z, w, EPS, backend="triton")
    assert rel_err(out, gated_rms_norm_ref(y, z, w, EPS)) < 1e-5
    yl = y.detach().requires_grad_()
    (dy,) = torch.autograd.grad(gated_rms_norm_fn(yl, z, w, EPS, backend="triton"), yl, dout)
    (dy_r,) = torch.autograd.grad(gated_rms_norm_ref(yl, z, w, EPS), yl, dout)
    assert rel_err(dy, dy_r) < 1e-5


def test_gate_zero_where_z_is_very_negative():
    """silu(z) -> 0 for z << 0: those channels output 0 and the norm runs over the rest."""
    y, z, w, _ = make_inputs(4, 16, torch.float32, 3)
    z[:, 8:] = -200.0
    out = gated_rms_norm_fn(y, z, w, EPS, backend="triton")
    assert (out[:, 8:].abs() < 1e-30).all()
    g = y[:, :8] * F.silu(z[:, :8])
    want = g * torch.rsqrt(g.square().sum(-1, keepdim=True) / 16 + EPS) * w[:8]
    assert rel_err(out[:, :8], want) < 1e-5


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_bad_shapes_are_one_line_errors(backend):
    y, z, w, _ = make_inputs(4, 12, torch.float32, 4)
    with pytest.raises(ValueError, match=r"z of shape \(4, 11\) for y of shape \(4, 12\)"):
        gated_rms_norm_fn(y, z[:, :11], w, backend=backend)
    with pytest.raises(ValueError, match=r"weight of shape \(10,\) for rows of 12"):
        gated_rms_norm_fn(y, z, w[:10], backend=backend)
    with pytest.raises(ValueError, match="5 groups do not divide rows of 12"):
        gated_rms_norm_fn(y, z, w, groups=5, backend=backend)


def test_errors_name_the_bad_input():
    y, z, w, _ = make_inputs(4, 12, torch.float32, 5)
    with pytest.raises(ValueError, match="0 groups do not divide rows of 12"):
        gated_rms_norm_fn(y, z, w, groups=0, backend="triton")
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        gated_rms_norm_fn(y[0, 0], z[0, 0], w, backend="ref")
    with pytest.raises(ValueError, match=r"gated_norm: y must be \(rows, dim\), got shape \(2, 2, 12\)"):
        tgn.gated_norm_fwd(y.view(2, 2, 12), z.reshape(2, 2, 12), w, EPS)


def test_backward_is_once_differentiable():
    y, z, w, _ = make_inputs(3, 16, torch.float32, 6)
    yl = y.detach().requires_grad_()
    out = gated_rms_norm_fn(yl, z, w, EPS, backend="triton")
    (dy,) = torch.autograd.grad(out.square().sum(), yl, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dy.sum().backward()
