"""The fused Triton RMSNorm against the reference: outputs and the gradients of x and weight.

On a CUDA machine the kernels run compiled; without one, conftest.py sets TRITON_INTERPRET=1 and
the same tests run through Triton's interpreter. The reference itself is checked against an
independent float64 computation, and against the exact code the RMSNorm module ran before.
"""

import sys
from pathlib import Path

import pytest
import torch

from bytelm.modules.norm import RMSNorm
from bytelm.ops.rms_norm import rms_norm_fn, rms_norm_ref
from bytelm.ops.triton import rms_norm as trn

from kernel_checks import nan_empty, rel_err

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5
# relative error ||a - b|| / ||b|| by the dtype of the result. bf16: half an ulp of rounding
# is 2^-9 ~ 2e-3 (and the interpreter truncates fp32 -> bf16 instead of rounding: up to 4e-3)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(shape, dtype, seed):
    """x (*shape) in dtype, weight (dim,) fp32 around 1, upstream gradient dy like x; on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3 + 0.5).to(dtype).to(DEVICE)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(DEVICE)
    dy = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    return x, w, dy


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test."""
    monkeypatch.setattr(trn, "_empty", nan_empty)


def grads(fn, x, w, dy, wrt=(True, True)):
    """fn(x, w)'s output and the gradients of the leaves picked by wrt (x, weight)."""
    xl = x.detach().requires_grad_(wrt[0])
    wl = w.detach().requires_grad_(wrt[1])
    y = fn(xl, wl)
    leaves = [t for t in (xl, wl) if t.requires_grad]
    return (y, *torch.autograd.grad(y, leaves, dy)) if leaves else (y,)


def check_against_ref(x, w, dy):
    y, dx, dw = grads(lambda a, b: rms_norm_fn(a, b, EPS, backend="triton"), x, w, dy)
    y_r, dx_r, dw_r = grads(lambda a, b: rms_norm_ref(a, b, EPS), x, w, dy)
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == w.shape
    assert y.dtype == dx.dtype == x.dtype and dw.dtype == w.dtype
    for name, t in (("y", y), ("dx", dx), ("dw", dw)):
        assert torch.isfinite(t).all(), name
    # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)) cancels (fully when dim = 1): measure its
    # error against the size of the cancelling terms
    x32 = x.double()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    dx_scale = (dy.double() * w.double() * rstd).norm()
    assert rel_err(y, y_r) < TOL[x.dtype], rel_err(y, y_r)
    assert rel_err(dx, dx_r, max(dx_scale, dx_r.double().norm())) < TOL[x.dtype]
    assert rel_err(dw, dw_r) < TOL[w.dtype], rel_err(dw, dw_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [1, 5, 100, 768] + ([2048, 8192, 16384] if CUDA else []))
@pytest.mark.parametrize("rows", [1, 3, 1000])
def test_rms_norm_matches_reference(rows, dim, dtype):
    check_against_ref(*make_inputs((rows, dim), dtype, seed=rows * 100_000 + dim))


@pytest.mark.parametrize("case", ["3d", "1d", "last_step", "transposed", "fp16"])
def test_rms_norm_layouts(case):
    """Any leading dims, strided rows (prefill's x[:, -1]), a non-unit column stride, fp16."""
    if case == "3d":
        x, w, dy = make_inputs((2, 7, 100), torch.float32, seed=1)
    elif case == "1d":
        x, w, dy = make_inputs((100,), torch.float32, seed=2)
    elif case == "last_step":
        x, w, dy = make_inputs((3, 5, 100), torch.bfloat16, seed=3)
        x, dy = x[:, -1], dy[:, -1]
    elif case == "transposed":
        x, _, dy = make_inputs((100, 6), torch.float32, seed=4)
        x, dy, w = x.t(), dy.t(), torch.linspace(0.5, 1.5, 100, device=DEVICE)
    else:
        x, w, dy = make_inputs((9, 33), torch.float16, seed=5)
    check_against_ref(x, w, dy)


@pytest.mark.parametrize("wrt", [(True, False), (False, True)], ids=["x_only", "weight_only"])
def test_rms_norm_partial_gradients(wrt):
    x, w, dy = make_inputs((37, 100), torch.float32, seed=6)
    ours = grads(lambda a, b: rms_norm_fn(a, b, EPS, backend="triton"), x, w, dy, wrt)
    ref = grads(lambda a, b: rms_norm_ref(a, b, EPS), x, w, dy, wrt)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


def test_rms_norm_no_grad_and_autocast():
    """No rstd stored without autograd; under autocast the output keeps x's dtype (fp32
    residual stream in, fp32 out), as the module always did."""
    x, w, _ = make_inputs((37, 100), torch.float32, seed=7)
    ref = rms_norm_ref(x, w, EPS)
    with torch.no_grad():
        assert rel_err(rms_norm_fn(x, w, EPS, backend="triton"), ref) < 1e-5
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = rms_norm_fn(x, w.requires_grad_(), EPS, backend="triton")
        y_ref = rms_norm_ref(x, w, EPS)
    assert y.dtype == y_ref.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("block_m,programs", [(1, 1), (4, 7), (16, 2)])
def test_rms_norm_tiles(block_m, programs, monkeypatch):
    """Other tiles and persistent-program counts (partial last tiles, programs with one tile
    more than others) give the same results; dweight is the same bits every run."""
    config = trn.rms_norm_config

    def cfg(dim, device, backward=False, **kw):
        c = dict(config(dim, device, backward, **kw), BLOCK_M=block_m)
        c.pop("PROGRAMS_PER_SM", None)
        return dict(c, programs=programs)
    monkeypatch.setattr(trn, "rms_norm_config", cfg)
    x, w, dy = make_inputs((45, 100), torch.float32, seed=8)
    check_against_ref(x, w, dy)
    dws = [grads(lambda a, b: rms_norm_fn(a, b, EPS, backend="triton"), x, w, dy)[2] for _ in range(2)]
    assert torch.equal(dws[0], dws[1])


@pytest.mark.parametrize("dim,fwd_warps,bwd_warps,programs", [
    (768, 4, 2, 8), (1024, 4, 2, 8), (2048, 8, 4, 8), (4096, 16, 8, 4), (16384, 16, 16, 2), (64, 4, 2, 8)])
def test_rms_norm_gpu_config(dim, fwd_warps, bwd_warps, programs):
    """The GPU tiles: forward BLOCK_N / 256 warps in [4, 16]; backward BLOCK_N / 512 in [2, 16]
    (16 elements of a row a thread), at most 8 persistent programs and 32 warps an SM."""
    cuda = torch.device("cuda")
    assert trn.rms_norm_config(dim, cuda)["num_warps"] == fwd_warps
    bwd = trn.rms_norm_config(dim, cuda, backward=True)
    assert (bwd["BLOCK_M"], bwd["num_warps"], bwd["PROGRAMS_PER_SM"]) == (1, bwd_warps, programs)


def test_launch_configs_read_the_cached_sm_count(monkeypatch):
    """The persistent norm backward and the conv backward size their grids from layout.sm_count
    (cached per device index: get_device_properties costs ~5 us a call); None off CUDA."""
    from bytelm.ops.triton import causal_conv1d as tcc, layout

    assert layout.sm_count(torch.device("cpu")) is None
    asked = []
    monkeypatch.setattr(layout, "_cuda_sm_count", lambda index: asked.append(index) or 132)
    cuda1 = torch.device("cuda", 1)
    cfg = trn.rms_norm_config(768, cuda1, backward=True)
    assert trn._n_programs(cfg, 10**6, cuda1) == 8 * 132
    assert tcc.bwd_iters(64, 8 * 132, cuda1) == 8 and tcc.bwd_iters(64, 4, cuda1) == 1
    assert asked == [1, 1, 1]


def test_rms_norm_wide_rows_and_empty_take_the_reference(monkeypatch):
    monkeypatch.setattr(trn, "MAX_FUSED_DIM", 64)
    x, w, dy = make_inputs((3, 100), torch.float32, seed=9)
    ours = grads(lambda a, b: rms_norm_fn(a, b, EPS, backend="triton"), x, w, dy)
    ref = grads(lambda a, b: rms_norm_ref(a, b, EPS), x, w, dy)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    x, w, dy = make_inputs((0, 5), torch.float32, seed=10)
    y, dx, dw = grads(lambda a, b: rms_norm_fn(a, b, EPS, backend="triton"), x, w, dy)
    assert y.shape == dx.shape == (0, 5) and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_matches_float64(dtype):
    """rms_norm_ref (fp32 maths) against the formula written out in float64, with float64
    autograd for the gradients."""
    x, w, dy = make_inputs((5, 3, 100), dtype, seed=11)
    y, dx, dw = grads(lambda a, b: rms_norm_ref(a, b, EPS), x, w, dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / x64.shape[-1] + EPS) * w64
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert y.dtype == dx.dtype == dtype and dw.dtype == torch.float32
    assert rel_err(y, y64) < TOL[dtype] / 2
    assert rel_err(dx, dx64) < TOL[dtype] / 2
    assert rel_err(dw, dw64) < 1e-6


@pytest.mark.parametrize("shape", [(4, 6, 100), (4, 100)], ids=["sequence", "step"])
def test_module_uses_the_op(shape):
    """RMSNorm keeps its parameters and state dict; on the CPU it gives exactly the bits of the
    code it ran before the kernels, on CUDA the Triton op's result."""
    norm = RMSNorm(100, eps=1e-5).to(DEVICE)
    assert list(norm.state_dict()) == ["weight"] and norm.eps == 1e-5
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(100))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(*shape).to(dtype).to(DEVICE)
        x32 = x.float()
        old = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
               * norm.weight.float()).to(x.dtype)
        y = norm(x)
        assert y.dtype == dtype and y.shape == x.shape
        if CUDA:
            assert rel_err(y, old) < TOL[dtype]
        else:
            assert torch.equal(y, old)


def test_rms_norm_errors():
    x, w, _ = make_inputs((3, 5), torch.float32, seed=12)
    with pytest.raises(ValueError, match="unknown rms_norm backend 'cuda'") as err:
        rms_norm_fn(x, w, EPS, backend="cuda")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"weight of shape \(4,\) for rows of 5") as err:
        rms_norm_fn(x, w[:4], EPS, backend="triton")
    assert "\n" not in str(err.value)


def test_rms_norm_benchmark_runs(tmp_path):
    """benchmarks/rms_norm.py still runs (tiny shapes; on the CPU through the interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import rms_norm

    out = tmp_path / "rms_norm.md"
    rows = rms_norm.main(["--device", DEVICE, "--shapes", "64x100,3x5", "--reps", "1",
                          "--out", str(out)])
    table = out.read_text()
    assert table.count("| 64 x 100 |") == 2 and table.count("| 3 x 5 |") == 2
    assert all(r["check"] < 1e-2 and r["gcheck"] < 1e-2 for r in rows)
