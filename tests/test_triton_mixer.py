"""The Mamba mixer on the Triton kernels equals the mixer on the references, end to end.

The mixer hands the conv and the scan (batch, channels, length) views of channel-major storage;
this checks that path as a whole (outputs, the gradient of the input and of every parameter; on
CPU the kernels run in Triton's interpreter, conftest.py), and that the mixer's own glue copies
nothing of the mixer's size in the forward or the backward.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bytelm.modules.mamba as mamba_module
from bytelm.models.lm import LM, ModelConfig
from bytelm.modules.mamba import MambaMixer

from kernel_checks import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mixer_grads(mixer, hidden, backend):
    mixer.scan_backend = backend
    mixer.zero_grad(set_to_none=True)
    h = hidden.detach().requires_grad_()
    out = mixer(h)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in mixer.named_parameters()}
    return out.detach(), h.grad.detach(), grads


@pytest.mark.parametrize("batch,length", [(2, 1), (2, 13), (2, 40), (1, 1), (1, 9)])
def test_mixer_triton_equals_reference(batch, length):
    torch.manual_seed(0)
    mixer = MambaMixer(d_model=8, d_state=4, expand=2).to(DEVICE)
    hidden = torch.randn(batch, length, 8, device=DEVICE)
    out, dh, grads = mixer_grads(mixer, hidden, "triton")
    out_ref, dh_ref, grads_ref = mixer_grads(mixer, hidden, "ref")
    assert rel_err(out, out_ref) < 1e-5
    assert rel_err(dh, dh_ref) < 1e-4
    for name in grads_ref:
        # At length 1, A never acts (the state before the first step is zero), so A_log's true
        # gradient is exactly 0 and the kernel's is rounding noise: measure that noise against
        # the input gradient's size instead of dividing by zero.
        scale = float(grads_ref[name].norm()) or float(dh_ref.norm())
        assert rel_err(grads[name], grads_ref[name], scale) < 1e-4, name


def test_mixer_state_after_prefill_matches_reference():
    torch.manual_seed(1)
    mixer = MambaMixer(d_model=8, d_state=4, expand=2).to(DEVICE)
    hidden = torch.randn(2, 11, 8, device=DEVICE)
    with torch.no_grad():
        mixer.scan_backend = "triton"
        out, state = mixer(hidden, return_state=True)
        mixer.scan_backend = "ref"
        out_ref, state_ref = mixer(hidden, return_state=True)
    assert rel_err(out, out_ref) < 1e-5
    assert torch.equal(state.conv, state_ref.conv)
    assert rel_err(state.ssm, state_ref.ssm) < 1e-5


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_lm_on_triton_kernels_trains_like_reference(autocast):
    """Two optimizer steps of a tiny byte LM: the same losses on either backend (under bf16
    autocast: the same within bf16 rounding)."""
    losses = {}
    for backend in ("triton", "ref"):
        torch.manual_seed(2)
        model = LM(ModelConfig(d_model=16, n_layer=2, d_state=4, scan_backend=backend)).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(3)).to(DEVICE)
        losses[backend] = []
        for _ in range(2):
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["ref"], rel=2e-2 if autocast else 1e-4)


@pytest.mark.parametrize("autocast,ckpt_dtype", [(False, torch.float32), (True, torch.bfloat16)],
                         ids=["fp32", "bf16_autocast"])
def test_mixer_scan_checkpoints_follow_autocast(autocast, ckpt_dtype, monkeypatch):
    """Training under bf16 autocast hands the scan bf16 inputs, so it stores bf16 chunk
    checkpoints (half the memory); fp32 training keeps fp32 ones."""
    import bytelm.ops.triton.mamba_inner as mamba_inner
    import bytelm.ops.triton.selective_scan as tss

    stored = []
    scan_fwd = tss.scan_fwd

    def recording_scan_fwd(*args, **kwargs):
        out, h_last, ckpt = scan_fwd(*args, **kwargs)
        stored.append(ckpt.dtype)
        return out, h_last, ckpt

    monkeypatch.setattr(tss, "scan_fwd", recording_scan_fwd)
    monkeypatch.setattr(mamba_inner, "scan_fwd", recording_scan_fwd)  # the training forward's
    torch.manual_seed(3)
    mixer = MambaMixer(d_model=8, d_state=4, expand=2, scan_backend="triton").to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = mixer(torch.randn(2, 9, 8, device=DEVICE))
    out.float().sum().backward()
    assert stored == [ckpt_dtype]
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())


class _KeepLayout(torch.autograd.Function):
    """Stands in for a kernel that writes its output, and its inputs' gradients, in its
    inputs' layouts (as the Triton conv and scan do) without computing anything."""

    @staticmethod
    def forward(ctx, first, *rest):
        ctx.shapes = [t for t in (first, *rest)]
        return torch.empty_like(first)

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros_like(t) for t in ctx.shapes)


class _BigCopies(TorchDispatchMode):
    def __init__(self, numel):
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if any(k in name for k in ("clone", "copy", "contiguous")) and isinstance(out, torch.Tensor) \
                and out.numel() >= self.numel:
            self.copies.append(f"{name} {tuple(out.shape)}")
        return out


def test_mixer_glue_copies_nothing_of_its_size(monkeypatch):
    def conv(x, weight, bias, activation, backend):
        return _KeepLayout.apply(x, weight, bias)

    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state, backend):
        return _KeepLayout.apply(u, delta, B, C, z)

    monkeypatch.setattr(mamba_module, "causal_conv1d_fn", conv)
    monkeypatch.setattr(mamba_module, "selective_scan_fn", scan)
    mixer = MambaMixer(d_model=8, d_state=4, expand=2)
    hidden = torch.randn(3, 10, 8, requires_grad=True)
    with _BigCopies(mixer.d_inner * 3 * 10) as log:
        mixer(hidden).sum().backward()
    assert log.copies == []


@pytest.mark.parametrize("backend,norm", [("ref", "ref"), ("naive", "ref"), ("triton", "triton"),
                                          ("auto", "auto")])
def test_norms_follow_the_kernel_backend(backend, norm):
    from bytelm.modules.norm import RMSNorm

    model = LM(ModelConfig(d_model=16, n_layer=1, scan_backend=backend))
    assert {m.backend for m in model.modules() if isinstance(m, RMSNorm)} == {norm}


def _grads_of(mixer, hidden, autocast, return_state):
    mixer.zero_grad(set_to_none=True)
    h = hidden.detach().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = mixer(h, return_state=True)[0] if return_state else mixer(h)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out.float() * weights).sum().backward()
    return out.detach(), {"input": h.grad, **{n: p.grad.clone() for n, p in mixer.named_parameters()}}


# the gradients that pass through the conv output's gradient, which the fused backward sums in
# fp32 where autograd summed a bf16 GEMM result and the scan's du (two roundings)
_ROUNDED_DIFFERENTLY = ("input", "in_proj.weight", "conv1d.weight", "conv1d.bias")
# under autocast on the GPU the fused backward writes these in fp32 (`weight_grad`), where
# autograd rounds the bf16 matmul's result and casts it
_WRITTEN_IN_FP32 = ("x_proj.weight", "dt_proj.weight") if DEVICE == "cuda" else ()


@pytest.mark.parametrize("autocast,batch,length,d_state", [
    (False, 2, 13, 4), (False, 1, 1, 4), (False, 3, 40, 4), (True, 2, 13, 4), (True, 1, 1, 4),
    (True, 3, 40, 4), (True, 2, 13, 16)], ids=lambda v: str(v))
def test_fused_mixer_equals_separate_ops(autocast, batch, length, d_state):
    """The training forward (conv, x_proj, dt_proj, scan as one node: ops/triton/mamba_inner.py)
    against the same Triton kernels as separate autograd ops (the prefill path, return_state):
    the same output and gradients, bit for bit except where the fused backward rounds once
    instead of twice (there within one rounding, and no farther from fp32 maths), where on the
    GPU under autocast it writes x_proj's and dt_proj's weight gradients in fp32 (one bf16
    rounding from the separate ops'), and, on the GPU, in the sums the scan backward makes by
    atomics (within fp32 reordering). At N=16 under autocast the scan backward reads B and C
    in fp32, which both paths pack again from the bf16 rows (`saved_bc`)."""
    torch.manual_seed(0)
    mixer = MambaMixer(d_model=16, d_state=d_state, expand=2, scan_backend="triton").to(DEVICE)
    hidden = torch.randn(batch, length, 16, device=DEVICE)
    out, grads = _grads_of(mixer, hidden, autocast, return_state=False)
    out_sep, grads_sep = _grads_of(mixer, hidden, autocast, return_state=True)
    assert torch.equal(out, out_sep)
    _, grads_fp32 = _grads_of(mixer, hidden, False, return_state=True)  # bf16's reference
    for name, g in grads.items():
        assert g.dtype == grads_sep[name].dtype, name
        if autocast and name in _WRITTEN_IN_FP32:
            # the separate ops' value is this one rounded to bf16: one rounding apart, per element
            sep = grads_sep[name]
            assert ((g - sep).abs() <= sep.abs() * 2 ** -8 + 1e-7).all(), name
            continue
        if name not in _ROUNDED_DIFFERENTLY:
            if DEVICE == "cuda":  # the GPU sums A's and D's gradients by atomics: any order
                assert rel_err(g, grads_sep[name]) < 1e-5, name
            else:
                assert torch.equal(g, grads_sep[name]), name
            continue
        assert rel_err(g, grads_sep[name]) < (1e-2 if autocast else 1e-6), name
        if autocast:
            err, err_sep = ((g - grads_fp32[name]).abs().sum() for g in (g, grads_sep[name]))
            assert err <= err_sep * 1.05, name


def test_fused_mixer_backward_joins_no_gradients():
    """No cat (x / z halves of in_proj's output, dt / B / C rows of x_proj's) and no add (the
    conv output's two gradients) in the training backward: the kernels write into shared buffers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    mixer = MambaMixer(d_model=8, d_state=4, expand=2, scan_backend="triton").to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = mixer(torch.randn(2, 9, 8, device=DEVICE, requires_grad=True))
    with Ops() as ops:
        out.float().sum().backward()
    assert not [n for n in ops.names if n.startswith(("aten.cat.", "aten.add.", "aten.add_."))]


@pytest.mark.parametrize("mode", ["train", "no_grad", "inference_mode", "no_param_grads"])
def test_scan_stores_checkpoints_only_for_autograd(mode, monkeypatch):
    """The training forward stores chunk checkpoints for the backward; an evaluation forward
    (no_grad, inference_mode, nothing requiring grad) must not: the fused mixer node and the
    plain scan op both decide it outside autograd.Function.forward, where grad mode is off."""
    import bytelm.ops.triton.mamba_inner as inner
    from bytelm.ops.triton import selective_scan as tss

    stored = []
    for mod in (inner, tss):
        real = mod.scan_fwd
        monkeypatch.setattr(mod, "scan_fwd", lambda *a, _real=real, **k: stored.append(k["store_ckpt"]) or _real(*a, **k))
    mixer = MambaMixer(d_model=8, d_state=4, expand=2, scan_backend="triton").to(DEVICE)
    hidden = torch.randn(2, 9, 8, device=DEVICE)
    u = torch.randn(2, 6, 9, device=DEVICE)
    scan_args = (u, torch.rand_like(u), -torch.rand(6, 4, device=DEVICE), torch.randn(2, 4, 9, device=DEVICE),
                 torch.randn(2, 4, 9, device=DEVICE))
    if mode == "no_param_grads":
        mixer.requires_grad_(False)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    if mode == "train":
        scan_args[0].requires_grad_(True)
    with context():
        mixer(hidden)
        tss.selective_scan_triton(*scan_args)
    assert stored == [mode == "train"] * 2
