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
