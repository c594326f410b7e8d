"""The scan op's host side: CPU time a call and aten ops dispatched, inference forward and
forward + backward. At small shapes the op is host-bound on the device (benchmarks/NOTES.md,
twelfth session): do_bench's time then includes the host's way to the kernels' launches.

    python benchmarks/scan_host.py                 # on a GPU: scan.py's shape 0 (8 x 2048 x 2048)
    python benchmarks/scan_host.py --stub          # any machine: kernels stubbed, tiny CPU tensors

"CPU ms a call" is the mean over --calls calls without synchronizing (on a GPU, while the queue
is not full, the host's cost of the call); --stub replaces the Triton launches by no-ops, so it
times our Python and torch's dispatch alone, and the aten ops are counted with a dispatch mode.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bytelm.ops.triton.selective_scan as tss  # noqa: E402
from scan import ours_fns  # noqa: E402  (the op's fwd and fwd+bwd calls, as scan.py times them)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def inputs(shape, device):
    b, d, l, n = shape
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=bf: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, generator=g).to(device),
                B=r(b, n, l), C=r(b, n, l), D=r(d, dtype=torch.float32), z=r(b, d, l),
                delta_bias=r(d, dtype=torch.float32)), r(b, d, l)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stub", action="store_true", help="no kernel launches, CPU tensors")
    ap.add_argument("--shape", default=None, help="b,d,l,n (default: 8,2048,2048,16; --stub 2,16,64,16)")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if args.stub:
        for name in ("_scan_fwd_kernel", "_scan_bwd_kernel", "_scan_fwd_segment_kernel",
                     "_scan_bwd_segment_kernel"):
            setattr(tss, name, _NoLaunch())
        tss.tie_order_ascending = lambda: False
    shape = tuple(int(v) for v in (args.shape or ("2,16,64,16" if args.stub else "8,2048,2048,16")).split(","))
    device = "cpu" if args.stub else "cuda"
    x, dout = inputs(shape, device)
    fwd, fwd_bwd = ours_fns(x, dout)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"shape {shape}, {'kernels stubbed, CPU tensors' if args.stub else torch.cuda.get_device_name()}")
    for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for _ in range(10):
            fn()
        sync()
        with _CountOps() as ops:
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(args.calls):
            fn()
        cpu = (time.perf_counter() - t) / args.calls
        sync()
        print(f"{name:8s} CPU {cpu * 1e3:.3f} ms a call, {ops.n} aten ops")


if __name__ == "__main__":
    main()
