"""Time bytelm's fused Triton RMSNorm against the plain-PyTorch reference (eager).

    python benchmarks/rms_norm.py                        # (65536, 768) and (65536, 1024), fp32 and bf16
    python benchmarks/rms_norm.py --tune --out benchmarks/results/rms-norm-h200.md
    python benchmarks/rms_norm.py --device cpu --shapes 64x100 --reps 1   # smoke run (interpreter)

Op: y = x32 * rsqrt(mean(x32 ** 2, -1) + eps) * weight, cast to x.dtype, on x of shape (rows, dim)
(fp32 or bf16) with an fp32 weight (dim,). "ref" is `rms_norm_ref`, what the RMSNorm module ran
before the kernels (eager PyTorch: several kernels and fp32 temporaries). "fwd" runs without
autograd (no rstd stored); "fwd+bwd" is the forward, then the gradients of x and weight for a
fixed upstream gradient (autograd.grad). On CUDA the times are medians of
triton.testing.do_bench_cudagraph: the calls replayed from a CUDA graph, so they measure the
GPU's work, not the host's Python and launch overhead (~0.1-0.3 ms a fwd+bwd call on the H200
machine, more than the kernels take at these sizes; inside a training step it overlaps other
GPU work). "eager launches" is the same fwd+bwd timed by triton.testing.do_bench, host overhead
included. On the CPU: medians of --reps wall-clock runs.

GB/s counts the bytes the op cannot avoid, at x's element size: the forward reads x and writes y
(2 x elements), the backward reads x and dy and writes dx (3 x elements), so fwd+bwd moves 5 x
elements; weight, rstd and the per-program dweight partials are negligible. The device-to-device
copy bandwidth (bytes read + written) is the practical ceiling.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, parse_shapes, rel_err, table_head, timer  # noqa: E402

SHAPES = [(65536, 768), (65536, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = 1e-5


def make_inputs(rows, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(device).requires_grad_()
    dy = torch.randn(rows, dim, generator=g).to(device=device, dtype=dtype)
    return x, weight, dy


def fns(x, weight, dy, backend):
    from bytelm.ops.rms_norm import rms_norm_fn

    def fwd():
        with torch.no_grad():
            return rms_norm_fn(x, weight, EPS, backend=backend)

    def fwd_bwd():
        y = rms_norm_fn(x, weight, EPS, backend=backend)
        return torch.autograd.grad(y, (x, weight), dy)
    return fwd, fwd_bwd


def tune(x, weight, dy):
    """Time the raw kernels for a few tiles (rows per tile, warps, backward programs per SM);
    one line per variant, with the achieved GB/s."""
    from triton.testing import do_bench

    from bytelm.ops.triton import rms_norm as trn

    bench = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    xd, w = x.detach(), weight.detach()
    rows, dim = xd.shape
    nbytes = xd.numel() * xd.element_size()
    _, rstd = trn.rms_norm_fwd(xd, w, EPS)
    base_f = trn.rms_norm_config(dim, xd.device, element_size=xd.element_size())
    base_b = trn.rms_norm_config(dim, xd.device, backward=True, element_size=xd.element_size())
    dx_ref, dw_ref = trn.rms_norm_bwd(xd, w, rstd, dy, cfg=base_b)
    lines = [f"  defaults: fwd {base_f}, bwd {base_b}"]
    for bm in (1, 2, 4, 8):
        for nw in (4, 8):
            cfg = dict(base_f, BLOCK_M=bm, num_warps=nw)
            ms = bench(lambda: trn.rms_norm_fwd(xd, w, EPS, store_rstd=False, cfg=cfg))
            lines.append(f"  fwd BLOCK_M={bm:2d} num_warps={nw:2d}: {ms:.4f} ms "
                         f"{2 * nbytes / ms / 1e6:5.0f} GB/s")
    for bm in (1, 2):
        for nw in (4, 8):
            for pps in (8, 16):
                cfg = dict(base_b, BLOCK_M=bm, num_warps=nw, PROGRAMS_PER_SM=pps)
                dx, dw = trn.rms_norm_bwd(xd, w, rstd, dy, cfg=cfg)
                err = max(rel_err(dx, dx_ref), rel_err(dw, dw_ref))
                ms = bench(lambda: trn.rms_norm_bwd(xd, w, rstd, dy, cfg=cfg))
                lines.append(f"  bwd BLOCK_M={bm} num_warps={nw:2d} programs/SM={pps:2d}: {ms:.4f} ms "
                             f"{3 * nbytes / ms / 1e6:5.0f} GB/s (rel diff {err:.0e})")
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default="all", help="'all', or comma-separated indices into SHAPES "
                    "or ROWSxDIM shapes (e.g. 64x100)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement on the CPU")
    ap.add_argument("--eager", action="store_true", help="CUDA: time with do_bench, not CUDA graphs")
    ap.add_argument("--tune", action="store_true", help="also time a few tiles of the raw kernels")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args(argv)

    if args.device == "cpu":  # Triton kernels run through the interpreter there
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bench = timer(args.device, args.reps, graph=not args.eager)
    eager_bench = timer(args.device, args.reps, graph=False)
    header = environment(args.device, eager_bench)
    print("\n".join(header), flush=True)

    rows, tune_lines = [], []
    for i, (n, d) in enumerate(parse_shapes(args.shapes, SHAPES)):
        for name in args.dtypes.split(","):
            x, weight, dy = make_inputs(n, d, DTYPES[name], args.device, seed=i)
            ours_f, ours_fb = fns(x, weight, dy, "triton")
            ref_f, ref_fb = fns(x, weight, dy, "ref")
            nbytes = x.numel() * x.element_size()
            row = dict(shape=f"{n} x {d}", dtype=name)
            row["check"] = rel_err(ours_f(), ref_f())
            row["gcheck"] = max(rel_err(a, r) for a, r in zip(ours_fb(), ref_fb()))
            row["fwd"], row["fb"] = bench(ours_f), bench(ours_fb)
            row["rfwd"], row["rfb"] = bench(ref_f), bench(ref_fb)
            row["efb"] = eager_bench(ours_fb)
            for key, mult in (("fwd", 2), ("fb", 5), ("rfwd", 2), ("rfb", 5)):
                row[key + "_gbs"] = mult * nbytes / row[key] / 1e6
            rows.append(row)
            print(row, flush=True)
            if args.tune and args.device == "cuda":
                print(f"tuning {row['shape']} {name}:", flush=True)
                tune_lines += [f"{row['shape']} {name}:"] + tune(x, weight, dy)
            del x, weight, dy
            if args.device == "cuda":
                torch.cuda.empty_cache()

    table = format_table(rows)
    print(table)
    if args.out:
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
        parts = ["# RMSNorm: bytelm Triton vs the PyTorch reference (eager)", "",
                 *header, f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                 f"- command: `{cmd}`",
                 "- fp32 weight, eps 1e-5; GB/s and timing as defined in benchmarks/rms_norm.py", "", table]
        if tune_lines:
            parts += ["", "Tile variants of the raw kernels (same run):", "", "```"] + tune_lines + ["```"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(parts) + "\n")
    return rows


def format_table(rows):
    head = ("| shape (rows x dim) | dtype | ours fwd ms | ref fwd ms | fwd speed-up | ours fwd GB/s "
            "| ref fwd GB/s | ours fwd+bwd ms | ref fwd+bwd ms | fwd+bwd speed-up | ours fwd+bwd GB/s "
            "| ref fwd+bwd GB/s | ours fwd+bwd ms, eager launches | out / grads vs ref |")
    lines = table_head(head)
    for r in rows:
        lines.append("| " + " | ".join([
            r["shape"], r["dtype"], f"{r['fwd']:.3f}", f"{r['rfwd']:.3f}", f"{r['rfwd'] / r['fwd']:.2f}",
            f"{r['fwd_gbs']:.0f}", f"{r['rfwd_gbs']:.0f}", f"{r['fb']:.3f}", f"{r['rfb']:.3f}",
            f"{r['rfb'] / r['fb']:.2f}", f"{r['fb_gbs']:.0f}", f"{r['rfb_gbs']:.0f}", f"{r['efb']:.3f}",
            f"{r['check']:.1e} / {r['gcheck']:.1e}",
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
