"""The fused RoPE (q, k, v from attention's projection) and SwiGLU gate kernels against their
references: outputs and input gradients, fp32 and bf16, odd lengths and widths.

On a CUDA machine the kernels run compiled; without one, conftest.py sets TRITON_INTERPRET=1 and
the same tests run through Triton's interpreter.
"""

import pytest
import torch
import torch.nn.functional as F

from bytelm.models.lm import LM, ModelConfig
from bytelm.modules.attention import Attention
from bytelm.ops import rotary as rot
from bytelm.ops import swiglu as sw
from bytelm.ops.triton import rotary as trot
from bytelm.ops.triton import swiglu as tsw

from kernel_checks import nan_empty, rel_err, round_bf16_like_the_gpu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# relative error by the results' dtype: fp32 differs only by the order of fused multiply-adds;
# bf16 by a rounding or two of 2^-9 (the reference rounds silu(g) before the product)
TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgot to write fails the test; bf16
    casts round to nearest even in the interpreter too, as on the GPU."""
    monkeypatch.setattr(trot, "_empty", nan_empty)
    monkeypatch.setattr(tsw, "_empty", nan_empty)
    if not CUDA:
        round_bf16_like_the_gpu(monkeypatch.setattr)


def _grads(fn, x, douts):
    xl = x.detach().requires_grad_(True)
    outs = fn(xl)
    outs = outs if isinstance(outs, tuple) else (outs,)
    (dx,) = torch.autograd.grad(outs, xl, douts)
    return [o.detach() for o in outs], dx


# ---- RoPE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, n_head, head_dim, start", [
    (2, 1, 2, 8, 0),        # one position
    (1, 63, 3, 16, 0),      # odd length, rows not a whole block
    (2, 1000, 2, 64, 0),    # the model's head size
    (1, 37, 2, 6, 5),       # half = 3: not a power of two; a decoding offset
])
def test_rotary_matches_reference(batch, length, n_head, head_dim, start, dtype):
    g = torch.Generator().manual_seed(batch * 1000 + length + head_dim)
    width = 3 * n_head * head_dim
    qkv = torch.randn(batch, length, width, generator=g).to(dtype).to(DEVICE)
    # upstream gradients as attention's backward gives them, (batch, n_head, length, head_dim)
    douts = tuple(torch.randn(batch, n_head, length, head_dim, generator=g).to(dtype).to(DEVICE)
                  for _ in range(3))
    fused = lambda x: rot.qkv_rotary_fn(x, n_head, start, 10000.0, backend="triton")
    ref = lambda x: rot.qkv_rotary_ref(x, n_head, start, 10000.0)
    outs, dqkv = _grads(fused, qkv, douts)
    outs_r, dqkv_r = _grads(ref, qkv, douts)
    for name, a, b in zip("qkv", outs, outs_r):
        assert a.shape == b.shape == (batch, n_head, length, head_dim) and a.dtype == dtype, name
        assert rel_err(a, b) <= TOL[dtype], name
    assert torch.equal(outs[2], outs_r[2])  # v is copied
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype
    assert rel_err(dqkv, dqkv_r) <= TOL[dtype]
    # v's gradient is copied; q's and k's are rotated back: the rotation is orthogonal
    assert torch.equal(dqkv[..., 2 * n_head * head_dim:],
                       douts[2].transpose(1, 2).reshape(batch, length, -1))


def test_rotary_takes_strided_inputs_and_runs_without_autograd():
    """qkv as a slice of a longer and wider tensor (its batch stride is not length x its
    position stride, which is not its width) and gradients in any layout; under no_grad the
    forward runs alone."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 12, 3 * 32 + 8, generator=g).to(DEVICE)
    qkv = big[:, 2:9, :96]
    assert qkv.stride(0) != qkv.shape[1] * qkv.stride(1) != 96
    with torch.no_grad():
        fused = rot.qkv_rotary_fn(qkv, 4, 0, 500.0, backend="triton")
    for a, b in zip(fused, rot.qkv_rotary_ref(qkv, 4, 0, 500.0)):
        assert rel_err(a, b) <= TOL[torch.float32]
    # contiguous (batch, length, n_head, head_dim) gradients seen as (batch, n_head, ...) views,
    # and one with a gap between positions
    douts = [torch.randn(2, 7, 4, 8, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2)]
    douts.append(torch.randn(2, 4, 14, 8, generator=g).to(DEVICE)[:, :, ::2])
    _, d = _grads(lambda x: rot.qkv_rotary_fn(x, 4, 0, 500.0, backend="triton"), qkv, tuple(douts))
    _, d_r = _grads(lambda x: rot.qkv_rotary_ref(x, 4, 0, 500.0), qkv, tuple(douts))
    assert rel_err(d, d_r) <= TOL[torch.float32]


def test_attention_decodes_the_same_on_the_kernels():
    """Attention's prefill (forward with its KV cache) and one-position steps at offsets > 0
    through the fused RoPE, against the same weights on the reference."""
    torch.manual_seed(1)
    ref = Attention(32, 4, backend="ref").to(DEVICE)
    fused = Attention(32, 4, backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 9, 32, device=DEVICE)
    with torch.no_grad():
        (out_r, cache_r), (out, cache) = ref(x, return_state=True), fused(x, return_state=True)
        assert rel_err(out, out_r) <= 1e-6 and rel_err(cache.k, cache_r.k) <= 1e-6
        for _ in range(4):
            h = torch.randn(3, 32, device=DEVICE)
            assert rel_err(fused.step(h, cache), ref.step(h, cache_r)) <= 1e-6
    assert cache.length == cache_r.length == 13


def test_fused_ops_refuse_double_backward():
    """Their backward kernels are not differentiable: a second derivative is an error, not a
    silent zero."""
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    for out in (sw.swiglu_fn(x, backend="triton"), rot.qkv_rotary_fn(x, 2, backend="triton")[0]):
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            g.sum().backward()


@pytest.mark.parametrize("shape, n_head, message", [
    ((2, 5, 95), 4, "width 95 is not 3 x 4 heads"),
    ((2, 5, 36), 4, "width 36 is not 3 x 4 heads of an even head_dim"),
    ((10, 96), 4, "qkv must be"),
])
def test_rotary_bad_shapes_are_one_line_errors(shape, n_head, message):
    with pytest.raises(ValueError, match=message):
        rot.qkv_rotary_fn(torch.zeros(shape), n_head, backend="triton")


# ---- SwiGLU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2), (3, 63, 2 * 37), (1000, 2 * 160), (2, 5, 2 * 1500)])
def test_swiglu_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (2 * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dtype).to(DEVICE)
    (out,), dx = _grads(lambda t: sw.swiglu_fn(t, backend="triton"), x, (dout,))
    (out_r,), dx_r = _grads(sw.swiglu_ref, x, (dout,))
    # an fp64 reference: the fused kernel rounds once, so it is at least as close as the reference
    (out64,), dx64 = _grads(sw.swiglu_ref, x.double(), (dout.double(),))
    assert out.shape == out_r.shape and out.dtype == dtype and dx.dtype == dtype
    assert rel_err(out, out_r) <= TOL[dtype] and rel_err(dx, dx_r) <= TOL[dtype]
    if dtype == torch.bfloat16:
        assert rel_err(out, out64) <= 1.05 * rel_err(out_r, out64) + 1e-7


def test_swiglu_takes_strided_rows_and_runs_without_autograd():
    """x's rows further apart than 2 x hidden (a slice of a wider tensor), dout's rows further
    apart than hidden; the output may be modified in place, as the reference's."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 7, 2 * 24 + 10, generator=g).to(DEVICE)[..., :48]
    with torch.no_grad():
        assert rel_err(sw.swiglu_fn(x, backend="triton"), sw.swiglu_ref(x)) <= TOL[torch.float32]
    dout = torch.randn(6, 7, 30, generator=g).to(DEVICE)[..., :24]

    def doubled(fn):
        return lambda t: fn(t).mul_(2)
    (_,), dx = _grads(doubled(lambda t: sw.swiglu_fn(t, backend="triton")), x, (dout,))
    (_,), dx_r = _grads(doubled(sw.swiglu_ref), x, (dout,))
    assert rel_err(dx, dx_r) <= TOL[torch.float32]
    # autograd hands the op's backward contiguous gradients here; the kernel also takes rows
    # apart (a dout it is given directly)
    (_,), dx_r = _grads(sw.swiglu_ref, x, (dout,))
    dx = tsw.swiglu_bwd(x.reshape(42, 48), dout.reshape(42, 24))
    assert dout.reshape(42, 24).stride(0) == 30
    assert rel_err(dx.view(6, 7, 48), dx_r) <= TOL[torch.float32]


def test_swiglu_odd_width_is_a_one_line_error():
    with pytest.raises(ValueError, match="gate and up"):
        sw.swiglu_fn(torch.zeros(3, 5), backend="triton")


# ---- in the model ----------------------------------------------------------------------------
def test_transformer_on_the_fused_kernels_equals_the_reference_one():
    """A Transformer block stack (attention + SwiGLU) with the kernels against the same weights
    on the references: logits and every parameter's gradient."""
    torch.manual_seed(0)
    kw = dict(d_model=32, n_layer=2, layer_pattern="AF", n_head=4, vocab_size=256)
    ref = LM(ModelConfig(**kw, scan_backend="ref")).to(DEVICE)
    fused = LM(ModelConfig(**kw, scan_backend="triton")).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 45), device=DEVICE)
    losses = []
    for model in (ref, fused):
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
        losses.append((logits.detach(), loss.item()))
    assert rel_err(losses[1][0], losses[0][0]) <= 1e-5
    for (name, p_r), p in zip(ref.named_parameters(), fused.parameters()):
        assert rel_err(p.grad, p_r.grad) <= 1e-4, name
