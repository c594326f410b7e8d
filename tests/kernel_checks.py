"""Helpers the kernel test files share."""

import torch


def rel_err(a, b, scale=None) -> float:
    """||a - b|| / ||b|| in float64, or / scale when given (the size of terms that cancel in b)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm() if scale is None else scale
    return ((a - b).norm() / max(float(den), 1e-30)).item()


def nan_empty(*shape, like=None, **kw):
    """A kernel module's `_empty` for tests: outputs start as NaN, so an element a kernel forgot
    to write fails the comparison."""
    t = torch.empty_like(like, **kw) if like is not None else torch.empty(*shape, **kw)
    return t.fill_(float("nan"))


def round_bf16_like_the_gpu(set_attribute=setattr):
    """Make Triton's interpreter round fp32 -> bf16 casts to nearest even, as the GPU does
    (cvt.rn); the interpreter truncates, which doubles and biases every bf16 result's error.
    set_attribute: setattr, or a pytest monkeypatch's (undone after the test)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.uint16)
            return interpreter.TensorHandle(bits.numpy(), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    set_attribute(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
