"""Offline register and spill statistics of the SSD (Mamba-2) kernels for sm_90 (no GPU).

The launches that one forward + backward of `ssd_xbc_fn` makes in the Mamba-2 mixer's layout
(x, B, C read channel-major from the conv output; ungated, as the mixer calls it since its norm
gates; --gate passes z) are captured with stub kernels, compiled for
GPUTarget("cuda", 90, 32) as Triton's launcher would specialise them, and read with the
wheel's cuobjdump (sass_bwd.py does the same for the Mamba-1 scan). Spilled registers show as
stack bytes; the twentieth session halved the backward's spills this way and the H200 then
ran that kernel 35% faster (benchmarks/NOTES.md).

    PYTHONPATH=. python benchmarks/ssd_sass.py [--shape 2x256x4x64x64] [--dtype bf16] [--gate] [--dump DIR]

Results are for the installed Triton; the H200 runs 3.6 (`pip install --target DIR triton==3.6.0`
and put DIR first on PYTHONPATH to match it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bytelm.ops.triton.ssd as tssd  # noqa: E402
from bytelm.ops.ssd import ssd_xbc_fn  # noqa: E402
from sass_bwd import _Capture, compile_captured, sass_stats  # noqa: E402

KERNELS = ["_ssd_chunk_state_kernel", "_ssd_state_pass_kernel", "_ssd_chunk_out_kernel",
           "_ssd_chunk_dstate_kernel", "_ssd_chunk_bwd_kernel"]


def capture(batch, length, heads, head_dim, state, dtype, gate=False):
    """The kernels' launches (grid, args, kwargs) in one forward + backward, in launch order."""
    stubs = {name: _Capture(getattr(tssd, name)) for name in KERNELS}
    saved = {name: getattr(tssd, name) for name in KERNELS + ["_INTERPRET"]}
    try:
        tssd._INTERPRET = False  # the launch arguments the GPU gets (tensor-core dots, not fp32 ones)
        for name, stub in stubs.items():
            setattr(tssd, name, stub)
        g = torch.Generator().manual_seed(0)
        width = heads * head_dim + 2 * state
        rows = torch.randn(width + heads * head_dim + heads, batch, length, generator=g).to(dtype)
        xbc_rows, z_rows, dt_rows = (t.requires_grad_() for t in rows.split([width, heads * head_dim, heads]))
        xbc, z, dt = (t.permute(1, 2, 0) for t in (xbc_rows, z_rows, dt_rows))
        A, D, bias = -torch.rand(heads), torch.randn(heads), torch.randn(heads)
        y = ssd_xbc_fn(xbc, dt, A, D, z.unflatten(-1, (heads, head_dim)) if gate else None, bias,
                       True, head_dim, 1, state, backend="triton")
        y.float().sum().backward()
    finally:
        for name, fn in saved.items():
            setattr(tssd, name, fn)
    return [(name, stub.fn, call) for name, stub in stubs.items() for call in stub.calls]


def kernel_table(shape, dtype, dump=None, gate=False) -> list[str]:
    """One markdown row a distinct launch: registers, stack (spills), shared memory, instructions."""
    rows, seen = [], set()
    for name, fn, (grid, a, kw) in capture(*shape, dtype, gate):
        key = (name, tuple(sorted((k, v) for k, v in kw.items() if not k.startswith("num_"))))
        if key in seen:  # e.g. a launch repeated with the same constants
            continue
        seen.add(key)
        kernel = compile_captured(fn, a, kw)
        st, sass, ttgir = sass_stats(kernel)
        label = name + (" (reverse)" if kw.get("REVERSE") else "")
        rows.append(f"| {label} | {st['regs']} | {st['stack']} | {kernel.metadata.shared} | {st['total']} |")
        if dump:
            os.makedirs(dump, exist_ok=True)
            Path(dump, f"{name}{'-reverse' if kw.get('REVERSE') else ''}.sass").write_text(sass)
            Path(dump, f"{name}{'-reverse' if kw.get('REVERSE') else ''}.ttgir").write_text(ttgir)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2x256x4x64x64", help="batch x length x heads x head_dim x state")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--dump", help="write each kernel's SASS and TTGIR here")
    ap.add_argument("--gate", action="store_true", help="pass z (the scan gated, as before)")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        ap.error(f"--shape {args.shape!r}: want batch x length x heads x head_dim x state, e.g. 2x256x4x64x64")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"triton {triton.__version__}, sm_90, {args.dtype}, shape {args.shape}"
          f"{', gated' if args.gate else ', ungated'}")
    print("| kernel | registers | stack (spill) bytes a thread | shared memory bytes | instructions |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(kernel_table(shape, dtype, args.dump, args.gate)))


if __name__ == "__main__":
    main()
