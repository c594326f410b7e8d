"""Time bytelm's fused Triton causal conv1d + SiLU against the PyTorch path the model uses today.

    python benchmarks/conv1d.py                          # the four shapes below, table on stdout
    python benchmarks/conv1d.py --tune --out benchmarks/results/conv1d-h200.md
    python benchmarks/conv1d.py --device cpu --shapes 2x8x64 --reps 2   # smoke run (interpreter)

Op: out = silu(conv1d(x) + bias), depthwise, causal, width 4, on x of shape (batch, dim, length)
in bf16. x is `xz[:, :dim]` of a contiguous (batch, 2 * dim, length) tensor (an in_proj output
laid out channel-first); `--layout channel-major` takes it from (2 * dim, batch, length) storage,
the layout of bytelm's mixer (and of mamba_ssm's); `--layout channels-last` from a
(batch, length, 2 * dim) tensor through a transpose.
Weight (dim, width) and bias (dim,) are fp32 parameters, the ops run under bf16 autocast as in
training. "torch" is the model's current path: nn.Conv1d(groups=dim, padding=width - 1), slice
the first `length` outputs, F.silu. "fwd+bwd" is the forward then the gradients of x, weight and
bias for a fixed upstream gradient. Eager columns: medians of triton.testing.do_bench (CUDA) or of
--reps wall-clock runs (CPU); they include Python, autograd and launch overhead, which dominate
small shapes. "graph" columns (CUDA): the same work captured once in a CUDA graph and replayed
(triton.testing.do_bench_cudagraph): GPU time alone.

GB/s counts the bytes the op cannot avoid: the forward reads x and writes out (2 x elements x 2 B),
the backward reads x and dout and writes dx (3 x elements x 2 B); weight traffic is negligible.
The copy bandwidth (device-to-device copy, bytes read + written) is the practical ceiling.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (environment, fmt, parse_shapes, rel_err, table_head, timer,  # noqa: E402
                    write_report)

SHAPES = [(8, 1536, 2048), (8, 1536, 8192), (2, 1536, 32768), (32, 1536, 2048)]


def make_inputs(b, d, l, width, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "channels-last":
        xz = torch.randn(b, l, 2 * d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    elif layout == "channel-major":  # the mixer's: (2 dim, batch, length) storage
        xz = torch.randn(2 * d, b, l, generator=g).to(device=device, dtype=dtype).transpose(0, 1)
    else:
        xz = torch.randn(b, 2 * d, l, generator=g).to(device=device, dtype=dtype)
    x = xz[:, :d].detach().requires_grad_()  # a strided leaf: the gradient is dx itself
    conv = nn.Conv1d(d, d, width, groups=d, padding=width - 1, bias=True).to(device)
    if device != "cuda":  # no autocast there: parameters in the activations' dtype
        conv = conv.to(dtype)
    dout = torch.randn(b, d, l, generator=g).to(device=device, dtype=dtype)
    return x, conv, dout


def ours_fns(x, conv, dout, autocast):
    from bytelm.ops.causal_conv1d import causal_conv1d_fn

    params = [x, conv.weight, conv.bias]

    def fwd():
        with torch.no_grad(), autocast():
            return causal_conv1d_fn(x, conv.weight, conv.bias, "silu", backend="triton")

    def fwd_bwd():
        with autocast():
            out = causal_conv1d_fn(x, conv.weight, conv.bias, "silu", backend="triton")
        return torch.autograd.grad(out, params, dout)
    return fwd, fwd_bwd


def torch_fns(x, conv, dout, autocast):
    length = x.shape[-1]
    params = [x, conv.weight, conv.bias]

    def fwd():
        with torch.no_grad(), autocast():
            return F.silu(conv(x)[..., :length])

    def fwd_bwd():
        with autocast():
            out = F.silu(conv(x)[..., :length])
        return torch.autograd.grad(out, params, dout)
    return fwd, fwd_bwd


def tune(x, conv, dout, bench):
    """Time the raw kernels for a few tiles; one line per variant. The backward always runs on
    length-contiguous x (conv_bwd copies a strided one), so its tiles are tuned there."""
    from bytelm.ops.triton import causal_conv1d as tc

    w = conv.weight.detach().reshape(conv.weight.shape[0], -1)
    b = conv.bias.detach()
    xd = x.detach()
    shift_tiles = [(128, 2, 4), (128, 4, 4), (128, 4, 8), (256, 2, 4), (256, 2, 8), (64, 8, 4)]
    strided_tiles = [(16, 128, 4), (32, 64, 4), (8, 256, 4), (32, 128, 4), (16, 256, 4)]
    base = tc.conv_config(xd, w.shape[1])
    tiles = shift_tiles if base["SHIFT_IN_REGS"] else strided_tiles
    lines = []
    for nv, bd, nw in tiles:
        cfg = dict(base, NV=nv, BLOCK_D=bd, num_warps=nw)
        ms = bench(lambda: tc.conv_fwd(xd, w, b, True, cfg=cfg))
        lines.append(f"  fwd {cfg}: {ms:.4f} ms")
    xc = xd.contiguous()
    dout2 = torch.randn_like(dout)
    base = tc.conv_config(xc, w.shape[1], backward=True)
    for nv, bd, nw in shift_tiles + [(128, 1, 4), (64, 2, 4), (32, 4, 4)]:
        for iters in (1, 2, None):
            cfg = dict(base, NV=nv, BLOCK_D=bd, num_warps=nw, ITERS=iters)
            ms = bench(lambda: tc.conv_bwd(xc, w, b, dout, True, cfg=cfg))
            # the mixer's call: a second output gradient (x_proj's) summed as it is read
            ms2 = bench(lambda: tc.conv_bwd(xc, w, b, dout, True, cfg=cfg, dout2=dout2))
            lines.append(f"  bwd {cfg}: {ms:.4f} ms, with dout2 {ms2:.4f} ms")
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default="all", help="'all', or comma-separated indices into SHAPES "
                    "or BxDxL shapes (e.g. 2x8x64)")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--layout", default="slice", choices=["slice", "channel-major", "channels-last"])
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement on the CPU")
    ap.add_argument("--tune", action="store_true", help="also time a few tiles of the raw kernels")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args(argv)

    if args.device == "cpu":  # Triton kernels run through the interpreter there
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bench = timer(args.device, args.reps)
    header = environment(args.device, bench)

    def autocast():
        on = args.device == "cuda" and dtype != torch.float32
        return torch.autocast(args.device, dtype=dtype, enabled=on)

    print("\n".join(header), flush=True)

    rows, tune_lines = [], []
    for i, (b, d, l) in enumerate(parse_shapes(args.shapes, SHAPES)):
        x, conv, dout = make_inputs(b, d, l, args.width, dtype, args.device, args.layout, seed=i)
        ours_f, ours_fb = ours_fns(x, conv, dout, autocast)
        ref_f, ref_fb = torch_fns(x, conv, dout, autocast)
        esize = x.element_size()
        fwd_bytes, fb_bytes = 2 * x.numel() * esize, 5 * x.numel() * esize
        row = dict(shape=f"{b} x {d} x {l}", fwd_bytes=fwd_bytes, fb_bytes=fb_bytes)
        row["check"] = rel_err(ours_f(), ref_f())
        grads, grads_ref = ours_fb(), ref_fb()
        row["gcheck"] = max(rel_err(a, r) for a, r in zip(grads, grads_ref))
        row["fwd"], row["fb"] = bench(ours_f), bench(ours_fb)
        row["tfwd"], row["tfb"] = bench(ref_f), bench(ref_fb)
        if args.device == "cuda":
            gbench = timer(args.device, args.reps, graph=True)
            row["gfwd"], row["gfb"] = gbench(ours_f), gbench(ours_fb)
            row["gtfwd"], row["gtfb"] = gbench(ref_f), gbench(ref_fb)
        row["fwd_gbs"] = fwd_bytes / row["fwd"] / 1e6
        row["fb_gbs"] = fb_bytes / row["fb"] / 1e6
        rows.append(row)
        print(row, flush=True)
        if args.tune and args.device == "cuda":
            print(f"tuning {row['shape']}:", flush=True)
            tune_lines += [f"{row['shape']}:"] + tune(x, conv, dout, bench)
        del x, conv, dout
        if args.device == "cuda":
            torch.cuda.empty_cache()

    table = format_table(rows)
    print(table)
    if args.out:
        write_report(args.out, "Causal conv1d + SiLU: bytelm Triton vs PyTorch (nn.Conv1d + slice + F.silu)",
                     header, argv,
                     [f"- {args.dtype} x ({args.layout}), fp32 weight/bias, width {args.width}, SiLU on; "
                      "GB/s and timing as defined in benchmarks/conv1d.py"], table, tune_lines)
    return rows


def format_table(rows):
    """Eager times (Python + launches included, as a training step runs them), then the same
    work replayed from a CUDA graph (GPU time alone; CUDA only), with GB/s and speed-ups."""
    head = ("| shape (b x d x l) | ours fwd ms | torch fwd ms | fwd speed-up | ours fwd GB/s "
            "| ours fwd+bwd ms | torch fwd+bwd ms | fwd+bwd speed-up | ours fwd+bwd GB/s "
            "| graph: ours fwd ms | torch fwd ms | ours fwd GB/s | ours fwd+bwd ms | torch fwd+bwd ms "
            "| ours fwd+bwd GB/s | out / grads vs torch |")
    lines = table_head(head)
    for r in rows:
        gfwd, gfb = r.get("gfwd"), r.get("gfb")
        lines.append("| " + " | ".join([
            r["shape"], fmt(r["fwd"]), fmt(r["tfwd"]), fmt(r["tfwd"] / r["fwd"], ".2f"),
            fmt(r["fwd_gbs"], ".0f"), fmt(r["fb"]), fmt(r["tfb"]), fmt(r["tfb"] / r["fb"], ".2f"),
            fmt(r["fb_gbs"], ".0f"), fmt(gfwd), fmt(r.get("gtfwd")),
            fmt(r["fwd_bytes"] / gfwd / 1e6 if gfwd else None, ".0f"), fmt(gfb), fmt(r.get("gtfb")),
            fmt(r["fb_bytes"] / gfb / 1e6 if gfb else None, ".0f"),
            f"{r['check']:.1e} / {r['gcheck']:.1e}",
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
