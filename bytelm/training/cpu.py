"""CPU training speed: glibc returns every large freed block to the OS by default, so each
(length, batch, dim, state) temporary of the reference scan is a fresh mmap whose pages fault
in one by one. Keeping freed memory in the heap halves the CPU step time of the default model
(measured: 2.4 s -> 1.25 s per step, d_model 128, 4 layers, 16 x 256 bytes, 2 cores)."""

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory_for_reuse() -> bool:
    """Raise glibc's mmap and trim thresholds; returns whether it applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
                and libc.mallopt(_M_TOP_PAD, 1 << 28))
