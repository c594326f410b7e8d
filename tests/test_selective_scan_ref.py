"""The reference scans agree with each other, with the step-by-step update, and gradcheck."""

import pytest
import torch

from bytelm.ops.selective_scan import (
    resolve_backend,
    selective_scan_fn,
    selective_scan_naive,
    selective_scan_ref,
    selective_state_update_ref,
)

from kernel_checks import rel_err


def make_inputs(batch, dim, length, nstate, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(grad)

    A = (-torch.rand(dim, nstate, generator=g, dtype=torch.float64) * 4 - 0.1).to(
        torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(grad)
    return dict(
        u=rnd(batch, dim, length), delta=rnd(batch, dim, length, scale=0.5), A=A,
        B=rnd(batch, nstate, length), C=rnd(batch, nstate, length),
        D=rnd(dim).detach().to(A.dtype).requires_grad_(grad), z=rnd(batch, dim, length),
        delta_bias=rnd(dim, scale=0.5).detach().to(A.dtype).requires_grad_(grad),
        initial_state=rnd(batch, dim, nstate).detach().to(A.dtype).requires_grad_(grad),
    )


@pytest.mark.parametrize("length", [1, 2, 17, 63, 64, 257])
@pytest.mark.parametrize("nstate", [1, 4, 16])
@pytest.mark.parametrize("flags", [dict(), dict(z=None), dict(D=None, delta_bias=None),
                                   dict(initial_state=None)])
def test_ref_matches_naive_outputs_and_gradients(length, nstate, flags):
    x = make_inputs(2, 3, length, nstate, grad=True)
    x.update(flags)
    kw = dict(delta_softplus=True, return_final_state=True)
    out_n, last_n = selective_scan_naive(**x, **kw)
    out_r, last_r = selective_scan_ref(**x, **kw)
    assert rel_err(out_r, out_n) < 1e-5 and rel_err(last_r, last_n) < 1e-5
    w_out, w_last = torch.randn_like(out_n), torch.randn_like(last_n)
    leaves = [v for v in x.values() if v is not None and v.requires_grad]
    g_n = torch.autograd.grad((out_n * w_out).sum() + (last_n * w_last).sum(), leaves)
    g_r = torch.autograd.grad((out_r * w_out).sum() + (last_r * w_last).sum(), leaves)
    for a, b in zip(g_r, g_n):
        assert rel_err(a, b) < 1e-4


def test_ref_gradcheck_float64():
    x = make_inputs(1, 2, 9, 3, dtype=torch.float64, grad=True)
    names = list(x)

    def fn(*args):
        out, last = selective_scan_ref(**dict(zip(names, args)), delta_softplus=True,
                                       return_final_state=True)
        return out, last

    assert torch.autograd.gradcheck(fn, tuple(x.values()), eps=1e-6, atol=1e-5)


def test_ref_keeps_input_dtype_and_bf16_is_close():
    x = make_inputs(2, 4, 33, 8)
    ref = selective_scan_ref(**x, delta_softplus=True)
    xb = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out = selective_scan_ref(**xb, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 3e-2


@pytest.mark.parametrize("nstate", [1, 16])
def test_state_update_matches_parallel_scan(nstate):
    x = make_inputs(2, 5, 12, nstate)
    out, last = selective_scan_ref(**x, delta_softplus=True, return_final_state=True)
    state = x["initial_state"].clone()
    steps = [selective_state_update_ref(state, x["u"][..., t], x["delta"][..., t], x["A"],
                                        x["B"][..., t], x["C"][..., t], D=x["D"], z=x["z"][..., t],
                                        dt_bias=x["delta_bias"], dt_softplus=True)
             for t in range(12)]
    assert rel_err(torch.stack(steps, -1), out) < 1e-5
    assert rel_err(state, last) < 1e-5


def test_chunked_scan_splits_like_one_long_scan():
    """initial_state in / final state out lets a sequence be scanned in pieces."""
    x = make_inputs(1, 3, 50, 4)
    whole, last = selective_scan_ref(**x, delta_softplus=True, return_final_state=True)
    first = {k: (v[..., :20] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    second = {k: (v[..., 20:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out1, mid = selective_scan_ref(**first, delta_softplus=True, return_final_state=True)
    second["initial_state"] = mid
    out2, last2 = selective_scan_ref(**second, delta_softplus=True, return_final_state=True)
    assert rel_err(torch.cat([out1, out2], -1), whole) < 1e-5 and rel_err(last2, last) < 1e-5


def test_backend_switch():
    assert resolve_backend("auto", torch.device("cpu")) == "ref"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        resolve_backend("fast", torch.device("cpu"))
    x = make_inputs(1, 2, 5, 2)
    assert rel_err(selective_scan_fn(**x, backend="naive"), selective_scan_fn(**x, backend="ref")) < 1e-5


def test_ref_under_bf16_autocast_keeps_fp32_maths():
    """Under autocast (bf16-mixed training) the reference must not mix dtypes in its backward."""
    x = make_inputs(2, 3, 40, 4, grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan_ref(**x, delta_softplus=True)
    out.float().square().sum().backward()
    ref = selective_scan_ref(**{k: v.detach() for k, v in x.items()}, delta_softplus=True)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6
    assert all(torch.isfinite(v.grad).all() for v in x.values() if v.grad is not None)
