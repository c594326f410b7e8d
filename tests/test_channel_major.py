"""Linear layers into and out of channel-major storage: values, gradients and their layouts."""

import pytest
import torch
import torch.nn.functional as F

from bytelm.ops.channel_major import linear_from_cm, linear_rows_and_cm, linear_to_cm, weight_grad


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    rows = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    cm = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: linear_to_cm(x, w, b), (rows, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: linear_from_cm(x, w, b), (cm, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: linear_rows_and_cm(x, w, b, 2), (rows, w, b))


def test_rows_and_cm_split_one_layer_into_two_layouts():
    """The first k outputs as rows, the rest channel-major: the values of one F.linear, and
    gradients (x's summed over both parts, the weight's whole) equal to its gradients."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, generator=g, requires_grad=True)
    x = torch.randn(9, 4, generator=g, requires_grad=True)
    rows, cm = linear_rows_and_cm(x, w, b, 2)
    assert rows.shape == (9, 2) and rows.is_contiguous() and cm.shape == (4, 9) and cm.is_contiguous()
    want = F.linear(x, w, b)
    torch.testing.assert_close(rows, want[:, :2])
    torch.testing.assert_close(cm, want[:, 2:].t())
    d_rows, d_cm = torch.randn(9, 2, generator=g), torch.randn(4, 9, generator=g)
    got = torch.autograd.grad((rows, cm), (x, w, b), (d_rows, d_cm))
    ref = torch.autograd.grad(want, (x, w, b), torch.cat([d_rows, d_cm.t()], 1))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)
    for k in (0, 6):
        with pytest.raises(ValueError, match=f"split {k} must leave outputs on both sides of 6"):
            linear_rows_and_cm(x, w, b, k)
    with pytest.raises(ValueError, match=r"x must be \(positions, 4\) for a weight of shape "
                                         r"\(6, 4\), got \(9, 3\)"):
        linear_rows_and_cm(x[:, :3], w, b, 2)
    with pytest.raises(ValueError, match=r"x must be \(positions, 4\).*got \(1, 9, 4\)"):
        linear_rows_and_cm(x[None], w, b, 2)
    with pytest.raises(ValueError, match=r"bias of shape \(5,\) for 6 outputs"):
        linear_rows_and_cm(x, w, b[:5], 2)


def test_rows_and_cm_under_autocast():
    """Outputs in the autocast dtype, as F.linear's; the weight's and bias's gradients in their
    own dtype (fp32)."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, generator=g, requires_grad=True)
    x = torch.randn(9, 4, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows, cm = linear_rows_and_cm(x, w, b, 2)
        want = F.linear(x, w, b)
    assert rows.dtype == cm.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(rows, want[:, :2], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(cm, want[:, 2:].t(), atol=2e-2, rtol=2e-2)
    (rows.float().sum() + cm.float().square().sum()).backward()
    assert w.grad.dtype == b.grad.dtype == torch.float32 and x.grad.shape == x.shape


def test_values_and_gradient_layouts():
    w, b = torch.randn(5, 3), torch.randn(5)
    rows = torch.randn(7, 3, requires_grad=True)
    y = linear_to_cm(rows, w, b)
    assert y.shape == (5, 7) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(rows, w, b).t())
    (dx,) = torch.autograd.grad(y, rows, torch.randn(5, 7))
    assert dx.is_contiguous()  # (positions, in) like its input: nothing left to copy

    cm = torch.randn(3, 7, requires_grad=True)
    y = linear_from_cm(cm, w, b)
    assert y.shape == (7, 5) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(cm.t(), w, b))
    (dx,) = torch.autograd.grad(y, cm, torch.randn(7, 5))
    assert dx.shape == (3, 7) and dx.is_contiguous()


def test_autocast_multiplies_in_the_autocast_dtype():
    w = torch.randn(5, 3, requires_grad=True)
    rows = torch.randn(7, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_to_cm(rows, w)
        ref = F.linear(rows, w)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref.t())
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and rows.grad.dtype == torch.float32


def test_weight_grad_is_written_in_the_parameter_dtype():
    """bf16 operands, fp32 parameter: on CUDA cuBLAS writes the fp32 gradient itself, far closer
    to the exact product than the bf16 result autograd would cast; elsewhere it is that cast."""
    g = torch.Generator().manual_seed(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(6, 300, generator=g).bfloat16().to(dev)
    b = torch.randn(300, 4, generator=g).bfloat16().to(dev)
    exact = a.double() @ b.double()
    out, rounded = weight_grad(a, b, torch.float32), (a @ b).float()
    assert out.dtype == torch.float32 and out.shape == (6, 4)
    if dev == "cuda":
        assert (out - exact).abs().max() < (rounded - exact).abs().max() / 10
    else:
        assert torch.equal(out, rounded)
    assert torch.equal(weight_grad(a, b, torch.bfloat16), a @ b)
    assert weight_grad(a.float(), b.float(), torch.float64).dtype == torch.float64
