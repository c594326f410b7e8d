"""Time bytelm's fused Triton RMSNorm against the plain-PyTorch reference (eager).

    python benchmarks/rms_norm.py                        # (65536, 768) and (65536, 1024), fp32 and bf16
    python benchmarks/rms_norm.py --tune --out benchmarks/results/rms-norm-h200.md
    python benchmarks/rms_norm.py --device cpu --shapes 64x100 --reps 1   # smoke run (interpreter)
    python benchmarks/rms_norm.py --op add-norm          # fused residual add + norm vs add, then norm

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

--op add-norm: a block boundary of the LM, x (rows, dim) the block output in --dtypes (bf16 in
bf16-mixed training) and the fp32 residual stream. "fused" is `add_rms_norm_fn` (y fp32 as the
model's fp32 training asks; under autocast the model writes y in bf16, 2 bytes an element less
in each pass; residual_out fp32); "unfused" is what the model ran before: torch's `residual + x`,
then our Triton norm, and in the backward autograd's sum of the norm's dx and the gradient along
the stream, plus the cast of that sum to x's dtype. fwd+bwd takes gradients of y and of
residual_out (both fp32) for x, residual and weight. GB/s counts the fused op's bytes: forward
reads x and residual, writes y and residual_out; backward reads residual_out, dy and
d(residual_out), writes dx and dresidual.

--op gated: the Mamba-2 mixer's norm, RMSNorm of y * silu(z) (`gated_rms_norm_fn`), z rows as
the mixer's in_proj writes them (--z-cm: a channel-major view instead). "ref" is `gated_rms_norm_ref`. GB/s: the
forward reads y and z and writes the output (3 x elements), the backward reads y, z and dout and
writes dy and dz (5 x): fwd+bwd 8 x. Default shape: the 90M Mamba-2's 65536 x 1536.
    python benchmarks/rms_norm.py --op gated --dtypes bf16 --tune
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, parse_shapes, rel_err, table_head, timer, write_report  # noqa: E402

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
    ap.add_argument("--op", default="norm", choices=["norm", "add-norm", "gated"],
                    help="norm: Triton vs reference; add-norm: fused residual add + norm vs "
                         "unfused; gated: the Mamba-2 gated norm, Triton vs reference")
    ap.add_argument("--z-cm", action="store_true", help="--op gated: z a channel-major view")
    args = ap.parse_args(argv)

    if args.device == "cpu":  # Triton kernels run through the interpreter there
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bench = timer(args.device, args.reps, graph=not args.eager)
    eager_bench = timer(args.device, args.reps, graph=False)
    header = environment(args.device, eager_bench)
    print("\n".join(header), flush=True)

    if args.op == "add-norm":
        rows = [add_norm_row(n, d, DTYPES[name], name, args.device, bench, eager_bench, seed=i)
                for i, (n, d) in enumerate(parse_shapes(args.shapes, SHAPES))
                for name in args.dtypes.split(",")]
        return write_table(args, argv, header, rows, format_add_norm_table(rows), [],
                           "Residual add + RMSNorm: fused (Triton) vs torch add, then Triton norm")
    if args.op == "gated":
        rows, tune_lines = [], []
        for i, (n, d) in enumerate(parse_shapes(args.shapes, GATED_SHAPES)):
            for name in args.dtypes.split(","):
                rows.append(gated_row(n, d, DTYPES[name], name, args.device, bench, eager_bench, i,
                                      args.z_cm))
                if args.tune and args.device == "cuda":
                    tune_lines += [f"{rows[-1]['shape']} {name}:"] + tune_gated(n, d, DTYPES[name],
                                                                                args.z_cm)
        return write_table(args, argv, header, rows, format_table(rows), tune_lines,
                           "Gated RMSNorm (Mamba-2): bytelm Triton vs the PyTorch reference (eager)")
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

    return write_table(args, argv, header, rows, format_table(rows), tune_lines,
                       "RMSNorm: bytelm Triton vs the PyTorch reference (eager)")


def write_table(args, argv, header, rows, table, tune_lines, title):
    print(table)
    if args.out:
        write_report(args.out, title, header, argv,
                     ["- fp32 weight, eps 1e-5; GB/s and timing as defined in benchmarks/rms_norm.py"],
                     table, tune_lines)
    return rows


def add_norm_fns(x, residual, weight, dy, dres, fused):
    """Forward (no autograd) and fwd+bwd of one block boundary, fused or as the model ran it
    before; both return y and residual_out (fp32 stream, fp32 y)."""
    from bytelm.ops.rms_norm import add_rms_norm_fn, rms_norm_fn

    def forward():
        if fused:
            return add_rms_norm_fn(x, residual, weight, EPS, torch.float32, backend="triton")
        h = residual + x
        return rms_norm_fn(h, weight, EPS, backend="triton"), h

    def fwd():
        with torch.no_grad():
            return forward()

    def fwd_bwd():
        return torch.autograd.grad(forward(), (x, residual, weight), (dy, dres))
    return fwd, fwd_bwd


def add_norm_row(n, d, dtype, name, device, bench, eager_bench, seed):
    x, weight, _ = make_inputs(n, d, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    residual = (3 * torch.randn(n, d, generator=g)).to(device).requires_grad_()
    dy, dres = (torch.randn(n, d, generator=g).to(device) for _ in range(2))
    ours_f, ours_fb = add_norm_fns(x, residual, weight, dy, dres, fused=True)
    old_f, old_fb = add_norm_fns(x, residual, weight, dy, dres, fused=False)
    row = dict(shape=f"{n} x {d}", dtype=name)
    row["check"] = max(rel_err(a, b) for a, b in zip(ours_f(), old_f()))
    row["gcheck"] = max(rel_err(a, b) for a, b in zip(ours_fb(), old_fb()))
    row["fwd"], row["fb"], row["ofwd"], row["ofb"] = (bench(f) for f in (ours_f, ours_fb, old_f, old_fb))
    row["efb"], row["eofb"] = eager_bench(ours_fb), eager_bench(old_fb)
    xb, nel = x.element_size(), x.numel()
    row["fwd_gbs"] = (xb + 12) * nel / row["fwd"] / 1e6   # x, residual in; y, residual_out out
    row["fb_gbs"] = (2 * xb + 28) * nel / row["fb"] / 1e6  # + h, dy, dres in; dx, dresidual out
    print(row, flush=True)
    if device == "cuda":
        del x, residual, weight, dy, dres
        torch.cuda.empty_cache()
    return row


def format_add_norm_table(rows):
    head = ("| shape (rows x dim) | x dtype | fused fwd ms | unfused fwd ms | fwd speed-up "
            "| fused fwd GB/s | fused fwd+bwd ms | unfused fwd+bwd ms | fwd+bwd speed-up "
            "| fused fwd+bwd GB/s | eager launches: fused / unfused fwd+bwd ms "
            "| out / grads vs unfused |")
    lines = table_head(head)
    for r in rows:
        lines.append("| " + " | ".join([
            r["shape"], r["dtype"], f"{r['fwd']:.3f}", f"{r['ofwd']:.3f}", f"{r['ofwd'] / r['fwd']:.2f}",
            f"{r['fwd_gbs']:.0f}", f"{r['fb']:.3f}", f"{r['ofb']:.3f}", f"{r['ofb'] / r['fb']:.2f}",
            f"{r['fb_gbs']:.0f}", f"{r['efb']:.3f} / {r['eofb']:.3f}",
            f"{r['check']:.1e} / {r['gcheck']:.1e}",
        ]) + " |")
    return "\n".join(lines)


GATED_SHAPES = [(65536, 1536)]


def gated_inputs(rows, dim, dtype, device, seed=0, z_cm=False):
    """y (rows, dim), z (rows, dim) (z_cm: a view of channel-major (dim, rows) storage),
    weight, dout."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
    z = torch.randn(dim, rows, generator=g).to(device=device, dtype=dtype).t()
    z = (z if z_cm else z.contiguous()).requires_grad_()
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(device).requires_grad_()
    dout = torch.randn(rows, dim, generator=g).to(device=device, dtype=dtype)
    return y, z, weight, dout


def gated_row(n, d, dtype, name, device, bench, eager_bench, seed, z_cm):
    from bytelm.ops.rms_norm import gated_rms_norm_fn

    y, z, weight, dout = gated_inputs(n, d, dtype, device, seed, z_cm)
    row = dict(shape=f"{n} x {d}", dtype=name)
    outs = {}
    for backend in ("triton", "ref"):
        def fwd(be=backend):
            with torch.no_grad():
                return gated_rms_norm_fn(y, z, weight, EPS, backend=be)

        def fwd_bwd(be=backend):
            return torch.autograd.grad(gated_rms_norm_fn(y, z, weight, EPS, backend=be),
                                       (y, z, weight), dout)
        outs[backend] = (fwd(), fwd_bwd())
        key = "" if backend == "triton" else "r"
        row[key + "fwd"], row[key + "fb"] = bench(fwd), bench(fwd_bwd)
        if backend == "triton":
            row["efb"] = eager_bench(fwd_bwd)
    row["check"] = rel_err(outs["triton"][0], outs["ref"][0])
    row["gcheck"] = max(rel_err(a, b) for a, b in zip(outs["triton"][1], outs["ref"][1]))
    nbytes = y.numel() * y.element_size()
    for key, mult in (("fwd", 3), ("fb", 8), ("rfwd", 3), ("rfb", 8)):
        row[key + "_gbs"] = mult * nbytes / row[key] / 1e6
    print(row, flush=True)
    return row


def tune_gated(n, d, dtype, z_cm):
    """The raw gated-norm kernels over rows a tile, warps and backward programs an SM."""
    from triton.testing import do_bench

    from bytelm.ops.triton import gated_norm as tgn

    bench = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    y, z, w, dout = (t.detach() for t in gated_inputs(n, d, dtype, "cuda", z_cm=z_cm))
    nbytes = y.numel() * y.element_size()
    base_f = tgn.gated_norm_config(d, y.device, element_size=y.element_size())
    base_b = tgn.gated_norm_config(d, y.device, backward=True, element_size=y.element_size())
    _, rstd = tgn.gated_norm_fwd(y, z, w, EPS)
    lines = [f"  defaults: fwd {base_f}, bwd {base_b}"]
    for bm in (1, 2, 4, 8):
        for nw in (4, 8, 16):
            cfg = dict(base_f, BLOCK_M=bm, num_warps=nw)
            try:
                ms = bench(lambda: tgn.gated_norm_fwd(y, z, w, EPS, store_rstd=False, cfg=cfg))
                lines.append(f"  fwd BLOCK_M={bm:2d} num_warps={nw:2d}: {ms:.4f} ms "
                             f"{3 * nbytes / ms / 1e6:5.0f} GB/s")
            except Exception as e:  # a tile that does not compile
                lines.append(f"  fwd BLOCK_M={bm:2d} num_warps={nw:2d}: failed ({type(e).__name__})")
            print(lines[-1], flush=True)
    for bm in (1, 2, 4):
        for nw in (2, 4, 8, 16):
            for pps in (2, 4, 8, 16):
                cfg = dict(base_b, BLOCK_M=bm, num_warps=nw, PROGRAMS_PER_SM=pps)
                try:
                    ms = bench(lambda: tgn.gated_norm_bwd(y, z, w, rstd, dout, cfg=cfg))
                    lines.append(f"  bwd BLOCK_M={bm:2d} num_warps={nw:2d} programs/SM={pps}: "
                                 f"{ms:.4f} ms {5 * nbytes / ms / 1e6:5.0f} GB/s")
                except Exception as e:
                    lines.append(f"  bwd BLOCK_M={bm:2d} num_warps={nw:2d} programs/SM={pps}: "
                                 f"failed ({type(e).__name__})")
                print(lines[-1], flush=True)
    return lines


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
