"""Time Mamba-2's SSD scan (bytelm's Triton kernels) against its reference, Mamba-1's scan at the
same channels, and mamba_ssm's `mamba_chunk_scan_combined` when it is importable.

    python benchmarks/ssd.py                          # the 90M model's shapes, bf16
    python benchmarks/ssd.py --tune --out benchmarks/results/ssd-h200.md
    python benchmarks/ssd.py --shapes 1 --no-ref --profile   # each kernel's share
    python benchmarks/ssd.py --device cpu --shapes 1x64x2x16x16 --reps 1   # smoke run (interpreter)

A shape is batch x length x heads x head_dim x state (one group of B and C, with D, z and a dt
bias; softplus on dt). "fwd" runs without autograd; "fwd+bwd" is the forward, then the gradients
of all inputs for a fixed upstream gradient (autograd.grad). CUDA: medians of
triton.testing.do_bench (eager: launches included); CPU: medians of --reps wall-clock runs.
"mamba-1" is bytelm's selective scan over the same batch x length x (heads x head_dim) channels at
state 16 (what the Mamba mixer runs), with z and D. TFLOP/s counts the SSD's chunked matmuls
(forward 2 T (N + P) + 4 N P FLOPs a step a head, T the chunk; fwd+bwd 3x that).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bytelm.ops.ssd import ssd_fn  # noqa: E402
from common import environment, fmt, parse_shapes, rel_err, table_head, timer, write_report  # noqa: E402

# batch x length x heads x head_dim x state: the 90M Mamba-2 (d_inner 1536) at 2K / 8K / 32K
# with states 64 and 128, and PERF.md's SSD peer shape
SHAPES = [(32, 2048, 24, 64, 64), (8, 8192, 24, 64, 64), (2, 32768, 24, 64, 64),
          (8, 8192, 24, 64, 128), (4, 8192, 32, 64, 128)]


def inputs(shape, device, dtype, g, gate=True):
    """x, dt, A, B, C, D, z, dt_bias; z None unless gate (the mixer gates in its norm now)."""
    b, length, h, p, n = shape
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, z = rnd(b, length, h, p), rnd(b, length, h, p)
    dt = (rnd(b, length, h).float() - 3).to(dtype)  # softplus(dt - 3 + bias): small steps
    A = -torch.rand(h, generator=g).to(device) * 4 - 0.5
    B, C = rnd(b, length, 1, n), rnd(b, length, 1, n)
    D, bias = torch.ones(h, device=device), torch.zeros(h, device=device)
    return [x, dt, A, B, C, D, z if gate else None, bias]


def fns(op, args, dout):
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]

    def fwd():
        with torch.no_grad():
            return op(*args)

    def fwd_bwd():
        return torch.autograd.grad(op(*leaves), [a for a in leaves if a is not None], dout)
    return fwd, fwd_bwd


def ssd_flops(shape, T=64):
    b, length, h, p, n = shape
    return b * length * h * (2 * T * (n + p) + 4 * n * p)


def mamba1_row(shape, device, g, bench):
    """Mamba-1's scan over the same channels (state 16): fwd and fwd+bwd ms."""
    from bytelm.ops.selective_scan import selective_scan_fn
    b, length, h, p, _ = shape
    d = h * p
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=torch.bfloat16)  # noqa: E731
    u, delta, z = rnd(b, d, length), rnd(b, d, length), rnd(b, d, length)
    A = -torch.rand(d, 16, generator=g).to(device) - 0.5
    B, C = rnd(b, 16, length), rnd(b, 16, length)
    D, bias = torch.ones(d, device=device), torch.zeros(d, device=device)
    f, fb = fns(lambda u_, dl, z_, B_, C_: selective_scan_fn(u_, dl, A, B_, C_, D=D, z=z_, delta_bias=bias,
                                                             delta_softplus=True),
                [u, delta, z, B, C], rnd(b, d, length))
    return bench(f), bench(fb)


def peer(shape, device, g, bench, gate=True):
    """mamba_ssm's Triton SSD (chunk 256) when importable, else (None, None)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None, None
    x, dt, A, B, C, D, z, bias = inputs(shape, device, torch.bfloat16, g, gate)
    f, fb = fns(lambda x_, dt_, B_, C_, z_: mamba_chunk_scan_combined(
        x_, dt_, A, B_, C_, 256, D=D, z=z_, dt_bias=bias, dt_softplus=True),
        [x, dt, B, C, z], torch.randn_like(x))
    return bench(f), bench(fb)


def tune(shape, device, g, bench, gate=True):
    """The raw kernels over chunk lengths, warps and heads a program (HB); a line each."""
    from bytelm.ops.triton.ssd import ssd_bwd, ssd_fwd
    x, dt, A, B, C, D, z, bias = inputs(shape, device, torch.bfloat16, g, gate)
    dout = torch.randn_like(x)
    lines = []
    for T, nw, hb in [(T, nw, hb) for T in (32, 64) for nw in (4, 8) for hb in (1, 2, 4)]:
        cfg = dict(T=T, num_warps=nw, num_stages=1, HB=hb)
        name = f"  T={T:3d} num_warps={nw} HB={hb}"
        try:
            f = bench(lambda: ssd_fwd(x, dt, A, B, C, D, z, bias, True, None, cfg=cfg))
            _, _, states, decay = ssd_fwd(x, dt, A, B, C, D, z, bias, True, None, cfg=cfg)
            bw = bench(lambda: ssd_bwd(x, dt, A, B, C, D, z, bias, True, states, decay, dout,
                                       None, cfg=cfg))
            lines.append(f"{name}: fwd {f:.4f} ms, bwd {bw:.4f} ms")
        except Exception as e:  # a tile that does not compile (registers, shared memory)
            lines.append(f"{name}: failed ({type(e).__name__}: {str(e)[:80]})")
        print(lines[-1], flush=True)
    return lines


def kernel_times(shape, device, g, gate=True) -> list[str]:
    """torch.profiler's CUDA time per kernel over 5 forward + backward calls; a line each."""
    from torch.profiler import ProfilerActivity, profile
    ins = inputs(shape, device, torch.bfloat16, g, gate)
    _, fb = fns(lambda *a: ssd_fn(*a, dt_softplus=True, backend="triton"), ins, torch.randn_like(ins[0]))
    fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fb()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 5e3, e.count // 5) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    return [f"  {ms:8.4f} ms x{n:<3d} {name[:90]}" for name, ms, n in rows[:12]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default="all",
                    help="'all', or a comma list of indices into SHAPES and BxLxHxPxN shapes")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement on the CPU")
    ap.add_argument("--no-ref", action="store_true", help="skip the reference (timing and diff)")
    ap.add_argument("--tune", action="store_true", help="also time the raw kernels' chunk / warps")
    ap.add_argument("--profile", action="store_true",
                    help="also print each kernel's time in a forward + backward (CUDA)")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    ap.add_argument("--no-gate", action="store_true",
                    help="no z: the scan ungated, as the Mamba-2 mixer calls it when its norm gates")
    args = ap.parse_args(argv)
    gate = not args.no_gate
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bench = timer(args.device, args.reps)
    header = environment(args.device, bench)
    print("\n".join(header), flush=True)
    g = torch.Generator().manual_seed(0)
    rows, tune_lines = [], []
    for shape in parse_shapes(args.shapes, SHAPES):
        ins = inputs(shape, args.device, torch.bfloat16, g, gate)
        dout = torch.randn_like(ins[0])
        row = dict(shape=" x ".join(map(str, shape)))
        ours = {}
        for backend in ("triton",) + (() if args.no_ref else ("ref",)):
            def op(x, dt, A, B, C, D, z, bias, be=backend):
                return ssd_fn(x, dt, A, B, C, D, z, bias, dt_softplus=True, backend=be)
            f, fb = fns(op, ins, dout)
            ours[backend] = (f(), *fb())
            row[backend] = (bench(f), bench(fb))
        if "ref" in ours:
            row["diff"] = max(rel_err(a, b) for a, b in zip(ours["triton"], ours["ref"]))
            del ours
        row["mamba1"] = mamba1_row(shape, args.device, g, bench)
        row["peer"] = peer(shape, args.device, g, bench, gate) if args.device == "cuda" else (None, None)
        row["tflops"] = 3 * ssd_flops(shape) / row["triton"][1] / 1e9
        print(row, flush=True)
        rows.append(row)
        if args.tune and args.device == "cuda":
            tune_lines += [f"{row['shape']}:"] + tune(shape, args.device, g, bench, gate)
        if args.profile and args.device == "cuda":
            tune_lines += [f"{row['shape']}, kernels of one forward + backward:"]
            tune_lines += kernel_times(shape, args.device, g, gate)
            print("\n".join(tune_lines[-13:]), flush=True)
    table = table_head("| batch x length x heads x head_dim x state | fwd ms | fwd+bwd ms | TFLOP/s | "
                       "ref fwd+bwd ms | max rel diff | mamba-1 fwd / fwd+bwd ms | "
                       "mamba_ssm fwd / fwd+bwd ms |")
    for r in rows:
        ref = r.get("ref", (None, None))
        table.append(f"| {r['shape']} | {fmt(r['triton'][0])} | {fmt(r['triton'][1])} | "
                     f"{fmt(r['tflops'], '.0f')} | {fmt(ref[1])} | "
                     f"{fmt(r.get('diff'), '.1e')} | {fmt(r['mamba1'][0])} / {fmt(r['mamba1'][1])} | "
                     f"{fmt(r['peer'][0])} / {fmt(r['peer'][1])} |")
    text = "\n".join(table)
    print(text)
    if args.out:
        write_report(args.out, "Mamba-2 SSD scan: bytelm Triton vs the reference, Mamba-1 and mamba_ssm",
                     header, argv, [], text, tune_lines, "Chunk length and warps of the raw kernels (same run):")
    return rows


if __name__ == "__main__":
    main()
