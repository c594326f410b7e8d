"""The fused residual add + RMSNorm: Triton against the reference (outputs, the gradients of x,
residual and weight, with and without a gradient along the residual stream), and the LM built
on it against the unfused block math it replaced.

On a CUDA machine the kernels run compiled; without one, conftest.py sets TRITON_INTERPRET=1 and
the same tests run through Triton's interpreter, with its fp32 -> bf16 casts made to round like
the GPU's (kernel_checks.round_bf16_like_the_gpu).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bytelm.models.lm import LM, ModelConfig
from bytelm.ops.rms_norm import add_rms_norm_fn, add_rms_norm_ref, rms_norm_ref
from bytelm.ops.triton import rms_norm as trn

from kernel_checks import nan_empty, rel_err, round_bf16_like_the_gpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5
# relative error ||a - b|| / ||b|| by the dtype of the result (bf16: a rounding of 2^-9 at most)
TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-3}


@pytest.fixture(autouse=True)
def poison_outputs_and_round_bf16(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test."""
    monkeypatch.setattr(trn, "_empty", nan_empty)
    if not CUDA:
        round_bf16_like_the_gpu(monkeypatch.setattr)


def make_inputs(rows, dim, dtype, seed, residual=True):
    """x (rows, dim) in dtype, residual fp32 (or None), weight fp32 around 1; on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * 2).to(dtype).to(DEVICE)
    res = (torch.randn(rows, dim, generator=g) * 3 + 0.5).to(DEVICE) if residual else None
    w = (1 + 0.5 * torch.randn(dim, generator=g)).to(DEVICE)
    return x, res, w


def upstream(y, residual_out, seed, along_residual=True):
    """Gradients for y (its dtype) and for residual_out (fp32, or None: not used further)."""
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=g).to(y.dtype).to(DEVICE)
    dres = torch.randn(y.shape, generator=g).to(DEVICE) if along_residual else None
    return dy, dres


def run(backend, x, res, w, dy, dres, out_dtype=None):
    """y, residual_out and the gradients of x, residual (when given) and weight."""
    leaves = [t.detach().requires_grad_() for t in (x, res, w) if t is not None]
    xl, rl, wl = leaves if res is not None else (leaves[0], None, leaves[1])
    y, res_out = add_rms_norm_fn(xl, rl, wl, EPS, out_dtype, backend=backend)
    outs, grads = (y, res_out), (dy, dres)
    if dres is None:
        outs, grads = (y,), (dy,)
    return (y, res_out, *torch.autograd.grad(outs, leaves, grads))


def check_against_ref(x, res, w, along_residual, out_dtype=None, seed=0):
    with torch.no_grad():
        y0, ro0 = add_rms_norm_ref(x, res, w, EPS, out_dtype)
    dy, dres = upstream(y0, ro0, seed, along_residual)
    ours = run("triton", x, res, w, dy, dres, out_dtype)
    ref = run("ref", x, res, w, dy, dres, out_dtype)
    y, res_out, dx, *rest = ours
    y_r, ro_r, dx_r, *rest_r = ref
    assert y.dtype == (out_dtype or x.dtype) and res_out.dtype == torch.float32
    assert dx.dtype == x.dtype and rest[-1].dtype == w.dtype
    for t in ours:
        assert torch.isfinite(t).all()
    # residual + x is one fp32 add in both: the same bits
    assert torch.equal(res_out, ro_r)
    assert rel_err(y, y_r) < TOL[y.dtype], rel_err(y, y_r)
    # the norm's backward cancels: measure against the size of its terms (plus dres, if any)
    rstd = torch.rsqrt(ro_r.detach().double().pow(2).mean(-1, keepdim=True) + EPS)
    scale = max((dy.double() * w.double() * rstd).norm(), dx_r.double().norm())
    assert rel_err(dx, dx_r, scale) < TOL[x.dtype], rel_err(dx, dx_r, scale)
    if res is not None:
        dres_in, dres_in_r = rest[0], rest_r[0]
        assert dres_in.dtype == res.dtype
        assert rel_err(dres_in, dres_in_r, scale) < TOL[torch.float32]
        # dx and dresidual are the same values, each in its input's dtype
        assert torch.equal(dx, dres_in.to(x.dtype))
    assert rel_err(rest[-1], rest_r[-1]) < TOL[torch.float32], rel_err(rest[-1], rest_r[-1])


@pytest.mark.parametrize("along_residual", [True, False], ids=["dres", "no_dres"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["residual", "first_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [7, 64, 768, 1000])
@pytest.mark.parametrize("rows", [1, 63, 1000])
def test_add_rms_norm_matches_reference(rows, dim, dtype, has_residual, along_residual):
    if dtype == torch.bfloat16 and not (has_residual or along_residual) and not CUDA:
        # the interpreter is slow in bf16; the model never normalises without either (first
        # block: no residual, a gradient along it; norm_f: a residual, no gradient along it)
        pytest.skip("bf16 without residual or its gradient: fp32 covers it under the interpreter")
    x, res, w = make_inputs(rows, dim, dtype, seed=rows * 10_000 + dim, residual=has_residual)
    check_against_ref(x, res, w, along_residual, seed=rows + dim)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.float32, torch.bfloat16)])
def test_add_rms_norm_out_dtype(x_dtype, out_dtype):
    """The model's case: a bf16 block output added to the fp32 stream, y in fp32 (what the
    unfused norm of the fp32 stream returned); and the other way round."""
    x, res, w = make_inputs(45, 100, x_dtype, seed=1)
    check_against_ref(x, res, w, along_residual=True, out_dtype=out_dtype)


@pytest.mark.parametrize("case", ["3d", "last_step", "bf16_residual"])
def test_add_rms_norm_layouts(case):
    """Leading dims, strided rows (prefill's hidden[:, -1]), a residual not in fp32."""
    g = torch.Generator().manual_seed(2)
    if case == "3d":
        x, res = torch.randn(2, 7, 100, generator=g), torch.randn(2, 7, 100, generator=g)
    elif case == "last_step":
        x, res = torch.randn(3, 5, 100, generator=g)[:, -1], torch.randn(3, 5, 100, generator=g)[:, -1]
    else:
        x, res = torch.randn(9, 33, generator=g), torch.randn(9, 33, generator=g).bfloat16()
    x, res = x.to(DEVICE), res.to(DEVICE)
    w = torch.linspace(0.5, 1.5, x.shape[-1], device=DEVICE)
    y, res_out = add_rms_norm_fn(x, res, w, EPS, backend="triton")
    assert y.shape == res_out.shape == x.shape
    dy, dres = torch.randn_like(y), torch.randn_like(res_out)
    for along in (True, False):
        leaves = [t.detach().requires_grad_() for t in (x, res, w)]
        outs = {}
        for backend in ("triton", "ref"):
            y, ro = add_rms_norm_fn(*leaves, EPS, backend=backend)
            outs[backend] = (y, ro, *torch.autograd.grad((y, ro) if along else (y,), leaves,
                                                          (dy, dres) if along else (dy,)))
        for a, b in zip(outs["triton"], outs["ref"]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert rel_err(a, b) < TOL[b.dtype], rel_err(a, b)


@pytest.mark.parametrize("wrt", ["x", "residual", "weight"])
def test_add_rms_norm_partial_gradients(wrt):
    x, res, w = make_inputs(37, 100, torch.float32, seed=3)
    leaves = {"x": x, "residual": res, "weight": w}
    results = []
    for backend in ("triton", "ref"):
        args = {k: v.detach().requires_grad_(k == wrt) for k, v in leaves.items()}
        y, ro = add_rms_norm_fn(args["x"], args["residual"], args["weight"], EPS, backend=backend)
        # residual_out does not depend on the weight
        outs = (y, ro) if wrt != "weight" else (y,)
        results.append(torch.autograd.grad(outs, args[wrt], [torch.ones_like(t) for t in outs]))
    assert rel_err(results[0][0], results[1][0]) < 1e-5


def test_add_rms_norm_no_grad_and_determinism():
    x, res, w = make_inputs(45, 100, torch.bfloat16, seed=4)
    y_r, ro_r = add_rms_norm_ref(x, res, w, EPS)
    with torch.no_grad():
        y, ro = add_rms_norm_fn(x, res, w.requires_grad_(), EPS, backend="triton")
    assert torch.equal(ro, ro_r) and rel_err(y, y_r) < TOL[torch.bfloat16]
    dws = [run("triton", x, res, w, torch.ones_like(y), ro)[-1] for _ in range(2)]
    assert torch.equal(dws[0], dws[1])


def test_add_rms_norm_wide_rows_and_empty_take_the_reference(monkeypatch):
    monkeypatch.setattr(trn, "MAX_FUSED_DIM", 64)
    x, res, w = make_inputs(3, 100, torch.float32, seed=5)
    dy, dres = torch.randn(3, 100), torch.randn(3, 100)
    ours = run("triton", x, res, w, dy.to(DEVICE), dres.to(DEVICE))
    ref = run("ref", x, res, w, dy.to(DEVICE), dres.to(DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    x, res, w = make_inputs(0, 5, torch.float32, seed=6)
    y, ro = add_rms_norm_fn(x, res, w, EPS, backend="triton")
    assert y.shape == ro.shape == (0, 5)


def test_reference_is_the_unfused_add_then_norm():
    """Bit for bit: the reference is `residual + x` then rms_norm_ref, in fp32."""
    x, res, w = make_inputs(5, 100, torch.bfloat16, seed=7)
    y, ro = add_rms_norm_ref(x, res, w, EPS, out_dtype=torch.float32)
    assert torch.equal(ro, res + x) and torch.equal(y, rms_norm_ref(res + x, w, EPS))
    y, ro = add_rms_norm_ref(x, None, w, EPS)
    assert torch.equal(ro, x.float()) and torch.equal(y, rms_norm_ref(x.float(), w, EPS).bfloat16())


def test_add_rms_norm_errors():
    x, res, w = make_inputs(3, 5, torch.float32, seed=8)
    for backend in ("ref", "triton"):
        with pytest.raises(ValueError, match=r"weight of shape \(4,\) for rows of 5") as err:
            add_rms_norm_fn(x, res, w[:4], EPS, backend=backend)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=r"residual of shape \(3, 4\) for x of shape \(3, 5\)"):
            add_rms_norm_fn(x, res[:, :4], w, EPS, backend=backend)
    with pytest.raises(ValueError, match="unknown rms_norm backend 'cuda'"):
        add_rms_norm_fn(x, res, w, EPS, backend="cuda")


# --------------------------------------------------------------------------------------------
# the LM on the fused op against the unfused blocks it replaced
# --------------------------------------------------------------------------------------------
def unfused_forward(model, ids):
    """The LM's forward as it was before the fused add: x + drop(mixer(norm(x))) per block."""
    x = model.drop(model.embedding(ids))
    for layer in model.layers:
        x = x + layer.drop(layer.mixer(layer.norm(x)))
    return F.linear(model.norm_f(x), model.embedding.weight)


def unfused_prefill(model, ids):
    x, states = model.embedding(ids), []
    for layer in model.layers:
        if layer.kind == "F":
            y, state = layer.mixer(layer.norm(x)), None
        else:
            y, state = layer.mixer(layer.norm(x), return_state=True)
        x = x + y
        states.append(state)
    return F.linear(model.norm_f(x[:, -1]), model.embedding.weight), states


def unfused_step(model, ids, states):
    x = model.embedding(ids)
    for layer, state in zip(model.layers, states):
        normed = layer.norm(x)
        x = x + (layer.mixer(normed) if layer.kind == "F" else layer.mixer.step(normed, state))
    return F.linear(model.norm_f(x), model.embedding.weight)


def tiny_lm(pattern, backend="ref", dropout=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, layer_pattern=pattern, d_state=4, n_head=4,
                      scan_backend=backend, dropout=dropout)
    return LM(cfg)


def logits_and_grads(model, forward, ids, autocast):
    """Logits and every parameter's gradient (by name) of a cross-entropy loss, in train mode
    (dropout on) from a fixed RNG seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = forward(model, ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    return logits, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("pattern", ["M", "MF", "MA"])
def test_lm_on_the_reference_is_bit_identical_to_the_unfused_blocks(pattern, autocast):
    """Ref backend, CPU: the same logits and parameter gradients, bit for bit, dropout included
    (the fused reference is the unfused add then norm, in the same order)."""
    model = tiny_lm(pattern, dropout=0.1).train()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    logits, grads = logits_and_grads(model, lambda m, i: m(i), ids, autocast)
    logits_old, grads_old = logits_and_grads(model, unfused_forward, ids, autocast)
    assert logits.dtype == logits_old.dtype and torch.equal(logits, logits_old)
    assert grads.keys() == grads_old.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_old[name]), name


def assert_same_generation(model, ids, ref_prefill, ref_step, device="cpu", autocast=True):
    """model.prefill on ids[:, :7], then model.step over the rest, under no_grad (and bf16
    autocast): the same logits (dtype and bits) and final states as ref_prefill / ref_step."""
    runs = []
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        for prefill, step in ((model.prefill, model.step), (ref_prefill, ref_step)):
            last, states = prefill(ids[:, :7])
            runs.append(([last] + [step(ids[:, t], states) for t in range(7, ids.shape[1])], states))
    (new, new_states), (old, old_states) = runs
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(new, old))
    for a, b in zip(new_states, old_states):
        assert (a is None) == (b is None)
        for name in getattr(a, "__dataclass_fields__", ()):  # (an MLP has no state)
            va, vb = getattr(a, name), getattr(b, name)
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("pattern", ["M", "MA"])
def test_lm_generation_is_bit_identical_to_the_unfused_blocks(pattern, autocast):
    """prefill and step (Mamba states, attention's KV cache) give the unfused logits and states.
    Under autocast this pins the step's y dtype: Mamba's step casts to its input's dtype, so the
    step's norms must return the stream's fp32 as the unfused one did, not the autocast bf16
    of the other forwards."""
    model = tiny_lm(pattern).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    assert_same_generation(model, ids, lambda i: unfused_prefill(model, i),
                           lambda i, s: unfused_step(model, i, s), autocast=autocast)


def test_lm_state_dict_keys_unchanged():
    """Checkpoints from before the fused add load: the same parameter names."""
    model = tiny_lm("MF")
    assert "norm_f.weight" in model.state_dict() and "layers.0.norm.weight" in model.state_dict()
    copy.deepcopy(model).load_state_dict(model.state_dict(), strict=True)
    assert not [k for k in model.state_dict() if "residual" in k]


@pytest.mark.parametrize("pattern", ["M", "MF"])
def test_lm_on_triton_matches_the_unfused_reference(pattern):
    """Triton backend (the interpreter without a GPU): the LM's logits and every parameter
    gradient against the unfused blocks on the reference, fp32."""
    ref = tiny_lm(pattern, "ref").to(DEVICE)
    ours = tiny_lm(pattern, "triton").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    logits, grads = logits_and_grads(ours, lambda m, i: m(i), ids, autocast=False)
    logits_ref, grads_ref = logits_and_grads(ref, unfused_forward, ids, autocast=False)
    assert rel_err(logits, logits_ref) < 1e-5
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, (name, rel_err(grads[name], grads_ref[name]))


# --------------------------------------------------------------------------------------------
# under autocast the norms write y in the autocast dtype (no cast of y, nor of its gradient)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_add_norm_writes_the_autocast_dtype(backend):
    """y in bf16 under bf16 autocast, in the weight's fp32 without; residual_out fp32 always."""
    from bytelm.modules.norm import RMSNorm

    norm = RMSNorm(100, EPS, backend).to(DEVICE)
    x, res, _ = make_inputs(9, 100, torch.bfloat16, seed=9)
    for autocast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            for r in (res, None):
                y, ro = norm.add_norm(x, r)
                assert y.dtype == dtype and ro.dtype == torch.float32
            assert norm.add_norm(x, res, torch.float32)[0].dtype == torch.float32  # explicit


@pytest.mark.parametrize("along_residual", [True, False], ids=["dres", "no_dres"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["residual", "first_block"])
@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_add_norm_in_bf16_is_the_fp32_norm_then_cast(backend, has_residual, along_residual):
    """Bit for bit: y written in bf16 is the fp32 y rounded to nearest even (the cast autocast
    ran at the next GEMM's input), and every gradient from a bf16 dy equals the fp32 norm's
    from that dy cast to fp32 (autograd's cast back)."""
    x, res, w = make_inputs(63, 768, torch.bfloat16, seed=10, residual=has_residual)
    dy, dres = upstream(x, x.float(), seed=11, along_residual=along_residual)  # dy bf16
    new = run(backend, x, res, w, dy, dres, out_dtype=torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (x, res, w) if t is not None]
    y, ro = add_rms_norm_fn(leaves[0], leaves[1] if has_residual else None, leaves[-1], EPS,
                            torch.float32, backend=backend)
    y = y.to(torch.bfloat16)
    outs, grads = ((y, ro), (dy, dres)) if along_residual else ((y,), (dy,))
    old = (y, ro, *torch.autograd.grad(outs, leaves, grads))
    assert new[0].dtype == torch.bfloat16
    for a, b in zip(new, old):
        assert a.dtype == b.dtype and torch.equal(a, b)


class _Casts(TorchDispatchMode):
    """Records the shapes of dtype-changing copies (casts)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            # (the interpreter's own copies are of uint8 buffers)
            if isinstance(src, torch.Tensor) and src.is_floating_point() and src.dtype != out.dtype:
                self.shapes.append(tuple(src.shape))
        return out


def test_triton_add_norm_in_bf16_casts_nothing():
    """The Triton op writes bf16 y and takes a bf16 dy in its kernels: no cast either way."""
    x, res, w = make_inputs(63, 100, torch.bfloat16, seed=12)
    dy, dres = upstream(x, res, seed=13)
    with _Casts() as log:
        run("triton", x, res, w, dy, dres, out_dtype=torch.bfloat16)
    assert (63, 100) not in log.shapes  # (under the interpreter: casts of its kernel tiles)


def fp32_norm_forward(model, ids):
    """LM.forward as it was before the norms wrote the autocast dtype: y in fp32, cast to bf16
    by its consumers (in_proj, attention's and the MLP's projections, the LM head)."""
    hidden, residual = model.drop(model.embedding(ids)), None
    for layer in model.layers:
        normed, residual = layer.norm.add_norm(hidden, residual, torch.float32)
        hidden = layer.drop(layer.mixer(normed))
    return F.linear(model.norm_f.add_norm(hidden, residual, torch.float32)[0], model.embedding.weight)


@pytest.mark.parametrize("backend,pattern", [("ref", "M"), ("ref", "MF"), ("ref", "MA"),
                                             ("triton", "M"), ("triton", "MF")])
def test_lm_under_autocast_is_bit_identical_to_the_fp32_norms(backend, pattern):
    """bf16 autocast training step: the same logits and every parameter gradient, bit for bit,
    as with fp32 norm outputs cast by their consumers (Triton: the fused mixer path). On a GPU
    the scan's backward sums dA, dB, dC and dD with atomics, in an order that varies run to
    run, so there each gradient must be within one bf16 rounding (2^-8, norm-wise) of the old
    path's or within 4x the old path's own run-to-run spread."""
    device = DEVICE if backend == "triton" else "cpu"
    model = tiny_lm(pattern, backend, dropout=0.1).to(device).train()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(6)).to(device)
    logits, grads = logits_and_grads(model, lambda m, i: m(i), ids, autocast=True)
    logits_old, grads_old = logits_and_grads(model, fp32_norm_forward, ids, autocast=True)
    assert logits.dtype == logits_old.dtype == torch.bfloat16 and torch.equal(logits, logits_old)
    if device == "cuda":
        grads_again = logits_and_grads(model, fp32_norm_forward, ids, autocast=True)[1]
    for name in grads:
        assert grads[name].dtype == grads_old[name].dtype, name
        if device == "cpu":
            assert torch.equal(grads[name], grads_old[name]), name
        else:
            err, spread = rel_err(grads[name], grads_old[name]), rel_err(grads_again[name], grads_old[name])
            assert err <= max(4 * spread, 2 ** -8), f"{name}: {err:.2e}, the old path's spread {spread:.2e}"


def test_lm_under_autocast_casts_no_activation():
    """Triton backend: no cast of a (positions, d_model) activation in the forward or the
    backward; with fp32 norm outputs there were two a norm (the input cast of in_proj, the MLP
    or the LM head, and its gradient's cast back). Only weights, logits and B / C are cast."""
    model = tiny_lm("MF", "triton").to(DEVICE)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    counts = []
    for forward in (lambda m, i: m(i), fp32_norm_forward):
        with _Casts() as log:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                logits = forward(model, ids[:, :-1])
            logits.float().sum().backward()
        counts.append(sum(s in ((32, 32), (2, 16, 32)) for s in log.shapes))  # 2 x 16 positions
    assert counts == [0, 2 * (len(model.layers) + 1)]


def fp32_norm_prefill(model, ids):
    hidden, residual, states = model.embedding(ids), None, []
    for layer in model.layers:
        normed, residual = layer.norm.add_norm(hidden, residual, torch.float32)
        out = layer.mixer(normed) if layer.kind == "F" else layer.mixer(normed, return_state=True)
        hidden, state = (out, None) if layer.kind == "F" else out
        states.append(state)
    y = model.norm_f.add_norm(hidden[:, -1], residual[:, -1], torch.float32)[0]
    return F.linear(y, model.embedding.weight), states


def fp32_norm_step(model, ids, states):
    hidden, residual = model.embedding(ids), None
    for layer, state in zip(model.layers, states):
        normed, residual = layer.norm.add_norm(hidden, residual, torch.float32)
        hidden = layer.mixer(normed) if layer.kind == "F" else layer.mixer.step(normed, state)
    return F.linear(model.norm_f.add_norm(hidden, residual, torch.float32)[0], model.embedding.weight)


@pytest.mark.parametrize("backend,pattern", [("ref", "MF"), ("ref", "MA"), ("triton", "M")])
def test_generation_under_autocast_is_bit_identical_to_the_fp32_norms(backend, pattern):
    """prefill (norms in bf16 now) and step (its norms keep fp32: Mamba's step computes in
    its input's dtype) give the logits and states of the fp32-norm model, bit for bit."""
    device = DEVICE if backend == "triton" else "cpu"
    model = tiny_lm(pattern, backend).to(device).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(8)).to(device)
    assert_same_generation(model, ids, lambda i: fp32_norm_prefill(model, i),
                           lambda i, s: fp32_norm_step(model, i, s), device=device)


def test_add_norm_benchmark_runs(tmp_path):
    """benchmarks/rms_norm.py --op add-norm runs (tiny shapes; on the CPU through the interpreter)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import rms_norm

    out = tmp_path / "add_norm.md"
    rows = rms_norm.main(["--op", "add-norm", "--device", DEVICE, "--shapes", "64x100,3x5",
                          "--reps", "1", "--out", str(out)])
    assert out.read_text().count("| 64 x 100 |") == 2 and len(rows) == 4
    assert all(r["check"] < 1e-5 and r["gcheck"] < 1e-2 for r in rows)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_residual_stream_is_fp32_or_wider(backend):
    """The stream is fp32 for bf16 / fp32 inputs (bf16-true models too, as mamba_ssm's
    residual_in_fp32) and stays fp64 for fp64 ones (the Triton op hands those to the reference):
    never silently narrowed."""
    for x_dtype, res_dtype, want in [(torch.bfloat16, torch.bfloat16, torch.float32),
                                     (torch.float32, None, torch.float32),
                                     (torch.float64, torch.float64, torch.float64),
                                     (torch.float64, None, torch.float64)]:
        x, res, w = make_inputs(5, 16, x_dtype, seed=21, residual=res_dtype is not None)
        res = res.to(res_dtype) if res is not None else None
        y, res_out = add_rms_norm_fn(x, res, w.to(x_dtype), 1e-5, x_dtype, backend=backend)
        assert res_out.dtype == want and y.dtype == x_dtype
        want_out = x.to(want) if res is None else res.to(want) + x.to(want)
        assert torch.equal(res_out, want_out)


def test_fp64_lm_keeps_an_fp64_stream():
    """An fp64 model (e.g. for gradient checks) computes its blocks in fp64 end to end."""
    model = tiny_lm("MF").double()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    hidden, residual = model.embedding(ids), None
    for layer in model.layers:
        normed, residual = layer.norm.add_norm(hidden, residual)
        assert residual.dtype == normed.dtype == torch.float64
        hidden = layer.mixer(normed)
    assert model(ids).dtype == torch.float64
