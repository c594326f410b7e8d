"""The fused Triton causal conv1d (+ SiLU) against the reference: outputs and every gradient.

On a CUDA machine the kernels run compiled at larger sizes; without one, conftest.py sets
TRITON_INTERPRET=1 and the same tests run through Triton's interpreter on small shapes.
The reference runs in float64 on the same device from the same input values.
"""

import sys
from pathlib import Path

import pytest
import torch

from bytelm.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_ref
from bytelm.ops.triton import causal_conv1d as tc

from kernel_checks import nan_empty, rel_err

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (batch, dim): the interpreter costs milliseconds per op and program, so CPU shapes stay
# small; dims that are not multiples of the channel block exercise the masks
SMALL = (3, 100) if CUDA else (2, 5)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative RMS error


def make_inputs(batch, dim, length, width, dtype, seed, bias=True, param_dtype=None):
    """x (batch, dim, length), weight (dim, width), bias (dim,) on DEVICE; the parameters in
    param_dtype (default: x's dtype)."""
    g = torch.Generator().manual_seed(seed)
    pdt = param_dtype or dtype
    x = torch.randn(batch, dim, length, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(dim, width, generator=g) / width ** 0.5).to(pdt).to(DEVICE)
    b = torch.randn(dim, generator=g).to(pdt).to(DEVICE) if bias else None
    return x, weight, b


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test."""
    monkeypatch.setattr(tc, "_empty", nan_empty)


def check_conv(x, weight, bias, activation, tol=None, seed=0):
    """Triton vs the float64 reference: the output and the gradients of every input."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    x_, w_ = leaves[0], leaves[1]
    b_ = leaves[2] if bias is not None else None
    # float64 copies of the same values
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[0], leaves64[1]
    b64 = leaves64[2] if bias is not None else None

    out = causal_conv1d_fn(x_, w_, b_, activation, backend="triton")
    out_ref = causal_conv1d_ref(x64, w64, b64, activation)
    tol = tol or TOL[x.dtype]
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.is_contiguous() or out.stride() == x.stride()  # x's layout or contiguous
    assert rel_err(out, out_ref) < tol, f"out: {rel_err(out, out_ref):.2e}"

    g = torch.Generator().manual_seed(seed + 1)
    # the upstream gradient in the output's dtype, so that both sides get the same values
    w_out = torch.randn(out.shape, generator=g).to(out.dtype).double().to(DEVICE)
    grads = torch.autograd.grad((out.double() * w_out).sum(), leaves)
    grads_ref = torch.autograd.grad((out_ref * w_out).sum(), leaves64)
    for name, leaf, a, b in zip("xwb", leaves, grads, grads_ref):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, f"d{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 17, 63, 1000, 2055])
def test_conv_matches_reference(length, width, dtype):
    x, w, b = make_inputs(*SMALL, length, width, dtype, seed=10 * length + width)
    check_conv(x, w, b, "silu", seed=length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("bias,activation", [(True, None), (False, "silu"), (False, None)],
                         ids=["bias", "silu", "bare"])
def test_conv_flags(bias, activation, width, dtype):
    x, w, b = make_inputs(*SMALL, 70, width, dtype, seed=width + 2 * bias, bias=bias)
    check_conv(x, w, b, activation)


@pytest.mark.parametrize("layout", ["slice", "channels_last", "every_other_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_strided_inputs(layout, dtype):
    """x as the model hands it over: a channel slice of a wider (batch, 2 * dim, length) tensor
    (batch stride != dim * length), a transposed (batch, length, 2 * dim) tensor (length stride
    2 * dim), or every other step of a longer sequence (length stride 2)."""
    batch, dim = SMALL
    length = 90
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    if layout == "slice":
        x = rnd(batch, 2 * dim, length)[:, :dim]
    elif layout == "channels_last":
        x = rnd(batch, length, 2 * dim).transpose(1, 2)[:, dim:]
    else:
        x = rnd(batch, dim, 2 * length)[..., ::2]
    assert not x.is_contiguous()
    _, w, b = make_inputs(batch, dim, length, 4, dtype, seed=6)
    check_conv(x, w, b, "silu")


def test_conv_output_and_dx_follow_a_channel_major_input():
    """The mixer's x is half of one matmul's (2 * dim, batch * length) output seen as
    (batch, dim, length): out and dx keep that layout, so the matmuls around read them in place;
    a channel-last input (length stride != 1) gives contiguous ones."""
    batch, dim = SMALL
    x = torch.randn(2 * dim, batch, 30, device=DEVICE)[:dim].transpose(0, 1).requires_grad_()
    _, w, b = make_inputs(batch, dim, 30, 4, torch.float32, seed=8)
    out = causal_conv1d_fn(x, w, b, "silu", backend="triton")
    assert out.stride() == x.stride()
    x64 = x.detach().double().requires_grad_()
    ref = causal_conv1d_ref(x64, w.double(), b.double(), "silu")
    assert rel_err(out, ref) < 1e-5
    g = torch.randn(out.shape, device=DEVICE)
    (dx,) = torch.autograd.grad(out, x, g)
    (dx_ref,) = torch.autograd.grad(ref, x64, g.double())
    assert rel_err(dx, dx_ref) < 1e-5 and dx.stride() == x.stride()
    x_cl = torch.randn(batch, 30, dim, device=DEVICE).transpose(1, 2)
    assert causal_conv1d_fn(x_cl, w, b, "silu", backend="triton").is_contiguous()


def test_conv_gradient_reaches_the_wide_tensor():
    """Through a slice, autograd scatters dx into the wide tensor's gradient."""
    batch, dim = SMALL
    xz = torch.randn(batch, 2 * dim, 40, device=DEVICE, requires_grad=True)
    _, w, b = make_inputs(batch, dim, 40, 4, torch.float32, seed=7)
    out = causal_conv1d_fn(xz[:, :dim], w, b, "silu", backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), xz)
    xz64 = xz.detach().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(causal_conv1d_ref(xz64[:, :dim], w.double(), b.double(), "silu").sum(),
                                      xz64)
    assert rel_err(grad, grad_ref) < 1e-5 and grad[:, dim:].abs().max() == 0


@pytest.mark.parametrize("tile", [dict(NV=2, BLOCK_D=2, ITERS=3), dict(NV=4, BLOCK_D=4, ITERS=2)])
def test_conv_small_tiles_and_several_tiles_per_program(tile, monkeypatch):
    """Many length blocks (the halo crosses every block edge), channel blocks cutting the dims,
    and backward programs walking several tiles: the results must not change."""
    config = tc.conv_config
    monkeypatch.setattr(tc, "conv_config", lambda *a, **k: dict(config(*a, **k), **tile))
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = make_inputs(1, 5, 45, 4, dtype, seed=tile["NV"])
        check_conv(x, w, b, "silu")


@pytest.mark.parametrize("tile", [None, dict(NV=2, BLOCK_D=2, ITERS=3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_backward_sums_a_second_output_gradient(dtype, tile):
    """conv_bwd(dout2=...): the output feeds two ops (the mixer's scan and x_proj) and their
    gradients are summed as they are read: the gradients of dout + dout2 (fp32 sum), one
    channel-major, the other contiguous, across tile edges; a shape mismatch is refused."""
    batch, dim = SMALL
    length = 45
    x, w, b = make_inputs(batch, dim, length, 4, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    dout = torch.randn(dim, batch, length, generator=g).to(dtype).to(DEVICE).transpose(0, 1)
    dout2 = torch.randn(batch, dim, length, generator=g).to(dtype).to(DEVICE)
    cfg = None if tile is None else dict(tc.conv_config(x, 4), **tile)
    dx, dw, db = tc.conv_bwd(x, w, b, dout, silu=True, cfg=cfg, dout2=dout2)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    ref = causal_conv1d_ref(x64, w64, b64, "silu")
    refs = torch.autograd.grad(ref, (x64, w64, b64), dout.double() + dout2.double())
    for got, want in zip((dx, dw, db), refs):
        assert rel_err(got, want) < TOL[dtype], rel_err(got, want)
    with pytest.raises(ValueError, match="dout2"):
        tc.conv_bwd(x, w, b, dout, silu=True, dout2=dout2[:, :, :-1])


@pytest.mark.parametrize("width", [1, 5, 8])
def test_conv_other_widths(width):
    x, w, b = make_inputs(*SMALL, 45, width, torch.float32, seed=width)
    check_conv(x, w, b, "silu")
    check_conv(x.transpose(1, 2).contiguous().transpose(1, 2), w, b, "silu")  # strided path


def test_conv_conv1d_weight_and_mixed_dtypes():
    """nn.Conv1d's (dim, 1, width) fp32 weight with bf16 activations (the model under bf16
    autocast): the gradients come back in the parameters' shapes and dtypes."""
    x, w, b = make_inputs(*SMALL, 64, 4, torch.bfloat16, seed=9, param_dtype=torch.float32)
    check_conv(x, w.unsqueeze(1), b, "silu", tol=1e-2)


def test_conv_fp16():
    x, w, b = make_inputs(*SMALL, 50, 4, torch.float16, seed=11)
    check_conv(x, w, b, "silu")


def test_conv_empty_sequence():
    x, w, b = make_inputs(2, 3, 0, 4, torch.float32, seed=12)
    x.requires_grad_()
    out = causal_conv1d_fn(x, w, b, "silu", backend="triton")
    assert out.shape == (2, 3, 0)
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert dx.shape == x.shape


def conv_naive(x, weight, bias, activation):
    """Step by step in float64: out[t] = act(bias + sum_k w[k] x[t - (width - 1) + k])."""
    batch, dim, length = x.shape
    w = weight.reshape(dim, -1).double()
    width = w.shape[1]
    out = torch.zeros(batch, dim, length, dtype=torch.float64, device=x.device)
    for t in range(length):
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                out[:, :, t] += w[:, k] * x[:, :, src].double()
    if bias is not None:
        out += bias.double()[:, None]
    if activation == "silu":
        out = out * torch.sigmoid(out)
    return out


@pytest.mark.parametrize("length,width,bias,activation", [
    (1, 4, True, "silu"), (3, 4, False, None), (30, 1, True, None), (30, 3, True, "silu"),
    (30, 6, False, "silu"),
])
def test_reference_matches_naive_loop(length, width, bias, activation):
    x, w, b = make_inputs(2, 3, length, width, torch.float32, seed=length + width, bias=bias)
    ref = causal_conv1d_ref(x, w.unsqueeze(1), b, activation)
    assert ref.dtype == torch.float32
    assert rel_err(ref, conv_naive(x, w, b, activation)) < 1e-6
    # bf16 in, bf16 out, fp32 maths
    ref16 = causal_conv1d_ref(x.bfloat16(), w, b, activation)
    assert ref16.dtype == torch.bfloat16
    assert rel_err(ref16, conv_naive(x.bfloat16(), w, b, activation)) < 1e-2


def test_reference_ignores_autocast():
    x, w, b = make_inputs(2, 3, 20, 4, torch.float32, seed=13)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = causal_conv1d_ref(x, w, b, "silu")
    assert out.dtype == torch.float32
    assert rel_err(out, causal_conv1d_ref(x, w, b, "silu")) < 1e-7


def test_backend_switch():
    x, w, b = make_inputs(2, 3, 20, 4, torch.float32, seed=14)
    auto = causal_conv1d_fn(x, w, b, "silu")
    picked = "triton" if CUDA else "ref"
    assert torch.equal(auto, causal_conv1d_fn(x, w, b, "silu", backend=picked))
    assert rel_err(causal_conv1d_fn(x, w, b, "silu", backend="triton"),
                   causal_conv1d_fn(x, w, b, "silu", backend="ref")) < 1e-5


@pytest.mark.parametrize("kwargs,message", [
    (dict(backend="cuda"), "unknown conv backend 'cuda'; choose one of auto, ref, triton"),
    (dict(activation="relu"), "unknown activation 'relu'; choose None or 'silu'"),
    (dict(activation="relu", backend="triton"), "unknown activation 'relu'"),
    (dict(weight_shape=(3, 2, 4)), r"weight must be \(3, width\) or \(3, 1, width\), got shape \(3, 2, 4\)"),
    (dict(weight_shape=(4, 4)), r"weight must be \(3, width\)"),
    (dict(bias_shape=(4,)), r"bias must be \(3,\), got shape \(4,\)"),
    (dict(weight_shape=(3, 9), backend="triton"), "the Triton kernels support width <= 8, got 9"),
])
def test_one_line_errors(kwargs, message):
    x, w, b = make_inputs(2, 3, 10, 4, torch.float32, seed=15)
    if "weight_shape" in kwargs:
        w = torch.randn(*kwargs.pop("weight_shape"), device=DEVICE)
    if "bias_shape" in kwargs:
        b = torch.randn(*kwargs.pop("bias_shape"), device=DEVICE)
    with pytest.raises(ValueError, match=message) as err:
        causal_conv1d_fn(x, w, b, **{"activation": "silu", **kwargs})
    assert "\n" not in str(err.value)


def test_conv1d_benchmark_runs(tmp_path):
    """benchmarks/conv1d.py still runs (tiny shapes; on the CPU through the interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import conv1d

    out = tmp_path / "conv1d.md"
    rows = conv1d.main(["--device", DEVICE, "--shapes", "2x8x24,1x5x17", "--reps", "1",
                        "--out", str(out)])
    table = out.read_text()
    assert table.count("| 2 x 8 x 24 |") == 1 and table.count("| 1 x 5 x 17 |") == 1
    assert all(r["check"] < 1e-2 and r["gcheck"] < 2e-2 for r in rows)
