"""Memory layouts the Triton kernels read without copying.

The kernels address (batch, channels, length) tensors through their batch and channel strides
with adjacent time steps (length stride 1): contiguous (batch, channels, length), and also the
channel-major (channels, batch, length) storage that one matrix multiply over all
batch x length positions gives (the Mamba mixer's layout, as in mamba_ssm). Outputs are
allocated with torch.empty_like, which keeps the strides of a tensor without gaps or overlaps.
"""

from __future__ import annotations

import functools

import torch


def is_dense(x: torch.Tensor) -> bool:
    """Do x's elements fill one block of memory, in any dim order (no gaps, no overlaps)?"""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(x.stride(), x.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def is_length_major(x: torch.Tensor) -> bool:
    """Are the steps of x (batch, channels, length) adjacent in memory, with no gaps?"""
    return (x.stride(2) == 1 or x.shape[2] == 1) and is_dense(x)


def length_major(x: torch.Tensor | None) -> torch.Tensor | None:
    """x (batch, channels, length) itself if `is_length_major`, else a contiguous copy (e.g. the
    transpose of a (batch, length, channels) tensor)."""
    if x is None or is_length_major(x):
        return x
    return x.contiguous()


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim's elements are adjacent (or it has one), else a contiguous copy:
    what kernels that address rows through their other strides read."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., n) as (rows, n) with `unit_last_stride` (a view when the strides allow)."""
    return unit_last_stride(t.reshape(-1, t.shape[-1]))


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x with exactly ref's strides (copied only if they differ), for kernels that address
    several tensors with one set of strides."""
    if x.stride() == ref.stride():
        return x
    return torch.empty_like(ref, dtype=x.dtype).copy_(x)


def empty_output(*shape, like=None, **kw):
    """A kernel's output allocation: torch.empty(*shape, **kw), or empty_like(like, **kw) (which
    keeps a dense tensor's strides). The kernel modules import it as `_empty`, which the tests
    swap for a NaN-filled one so that an element a kernel forgot to write shows."""
    return torch.empty_like(like, **kw) if like is not None else torch.empty(*shape, **kw)


# host-side launch arithmetic: triton.cdiv and triton.next_power_of_2 are ConstexprFunctions,
# ~5-10 us a call from Python, and a scan forward + backward made ~18 such calls: at small
# shapes the op's CPU time is its wall time (benchmarks/NOTES.md, twelfth session)
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None elsewhere. Cached: launch configs ask on
    every call, and get_device_properties costs ~5 us of CPU a call (at small shapes the ops'
    CPU time up to their kernels' launch shows in their time)."""
    if device.type != "cuda":
        return None
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
