"""Time the Transformer's fused Triton element-wise ops against their plain-PyTorch references.

    python benchmarks/transformer_ops.py                 # the 90M and ~350M shapes, bf16
    python benchmarks/transformer_ops.py --tune --out benchmarks/results/transformer-ops-h200.md
    python benchmarks/transformer_ops.py --device cpu --tokens 64 --reps 1   # smoke run (interpreter)
    python benchmarks/transformer_ops.py --attention     # also: SDPA's training backends (CUDA)

Ops (bytelm/ops/rotary.py, bytelm/ops/swiglu.py):
  rope   : qkv (batch, length, 3 x d_model) -> q, k rotated and v, each (batch, n_head, length, head_dim)
  swiglu : x (tokens, 2 x hidden) -> silu(gate) * up (tokens, hidden)
"ref" is what the modules ran before the kernels (eager PyTorch, fp32 temporaries). "fwd" runs
without autograd; "fwd+bwd" is the forward, then the input's gradient for fixed upstream
gradients (autograd.grad). CUDA: medians of triton.testing.do_bench_cudagraph (GPU time, no
launch overhead); CPU: medians of --reps wall-clock runs.

GB/s counts the bytes the op cannot avoid at the input's element size: rope's forward reads qkv
and writes q, k, v (2 x its elements), its backward reads dq, dk, dv and writes d(qkv) (2 x);
swiglu's forward reads x and writes half as much (1.5 x x's elements), its backward reads x and
dout and writes dx (2.5 x). The device-to-device copy bandwidth (in the header) is the ceiling.

--attention (CUDA): causal SDPA forward + backward at the 90M Transformer's shapes (12 heads of
64; q, k, v laid out as the fused RoPE writes them) for 65,536 positions at contexts 2K / 8K /
32K, with each of SDPA's backends allowed alone: which one a training step should run. Timed
by triton.testing.do_bench (eager: milliseconds of GPU work a call, launches included).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bytelm.ops.rotary import qkv_rotary_fn  # noqa: E402
from bytelm.ops.swiglu import swiglu_fn  # noqa: E402
from common import environment, fmt, rel_err, table_head, timer, write_report  # noqa: E402

# (label, d_model, n_head, SwiGLU hidden): the throughput benchmark's Transformers
SIZES = [("90m", 768, 12, 2048), ("350m", 1024, 16, 2816)]


def op_fns(op, x, douts):
    """op(x)'s forward without autograd, and its forward then x's gradient for douts."""
    def fwd():
        with torch.no_grad():
            return op(x)

    def fwd_bwd():
        return torch.autograd.grad(op(x), x, douts)
    return fwd, fwd_bwd


def measure(label, shape, fns_of, nbytes_f, nbytes_b, bench):
    """One table row: fused and reference timed, their results compared."""
    ours_f, ours_fb = fns_of("triton")
    ref_f, ref_fb = fns_of("ref")
    row = dict(op=label, shape=shape)
    ours = [*_tuple(ours_f()), *_tuple(ours_fb())]
    row["diff"] = max(rel_err(a, b) for a, b in zip(ours, [*_tuple(ref_f()), *_tuple(ref_fb())]))
    row["fwd"], row["fb"], row["rfwd"], row["rfb"] = (bench(f) for f in (ours_f, ours_fb, ref_f, ref_fb))
    row["fwd_gbs"] = nbytes_f / row["fwd"] / 1e6
    row["fb_gbs"] = (nbytes_f + nbytes_b) / row["fb"] / 1e6
    print(row, flush=True)
    return row


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def tune_rope(qkv, n_head, douts, bench):
    """Raw rotary kernels over tiles (positions a program, warps); a line each with GB/s."""
    from bytelm.ops.rotary import rope_tables
    from bytelm.ops.triton import rotary as trot

    b, length, width = qkv.shape
    cos, sin = rope_tables(length, 0, width // 3 // n_head, 10000.0, qkv.device)
    nbytes = 2 * qkv.numel() * qkv.element_size()
    dq, dk, dv = douts
    lines = []
    for block_r in (16, 32, 64, 128):
        for nw in (2, 4, 8):
            f = bench(lambda: trot.rotary_fwd(qkv, cos, sin, n_head, block_r, nw))
            bw = bench(lambda: trot.rotary_bwd(dq, dk, dv, cos, sin, qkv.dtype, block_r, nw))
            lines.append(f"  rope block_r={block_r:3d} num_warps={nw}: fwd {f:.4f} ms "
                         f"{nbytes / f / 1e6:5.0f} GB/s, bwd {bw:.4f} ms {nbytes / bw / 1e6:5.0f} GB/s")
            print(lines[-1], flush=True)
    return lines


def attention_rows(tokens, bench, contexts=(2048, 8192, 32768), n_head=12, head_dim=64):
    """SDPA fwd+bwd (causal, bf16) ms by backend; NaN where a backend refuses the inputs."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "memory-efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for ctx in contexts:
        b = tokens // ctx
        q, k, v = (torch.randn(b, ctx, n_head, head_dim, device="cuda", dtype=torch.bfloat16)
                   .transpose(1, 2).requires_grad_() for _ in range(3))
        dout = torch.randn_like(q)
        row = dict(shape=f"{b} x {ctx}, {n_head} x {head_dim}")
        for name, backend in backends.items():
            def fwd_bwd():
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return torch.autograd.grad(out, (q, k, v), dout)
            try:
                fwd_bwd()
                row[name] = bench(fwd_bwd)
            except RuntimeError as e:  # a backend that does not take these inputs
                print(f"{name} at {row['shape']}: {str(e).splitlines()[0][:120]}", flush=True)
                row[name] = float("nan")
        # causal: half the scores, 4 b h ctx^2 d FLOPs forward, 2.5x that forward + backward
        flops = 2.5 * 4 * b * n_head * ctx * ctx * head_dim / 2
        best = min((row[n] for n in backends if row[n] == row[n]), default=float("nan"))
        row["tflops"] = flops / best / 1e9
        rows.append(row)
        print(row, flush=True)
    table = table_head("| batch x context, heads x head_dim | cuDNN ms | flash ms | memory-efficient ms | "
                       "best TFLOP/s |")
    for r in rows:
        table.append(f"| {r['shape']} | {fmt(r['cuDNN'])} | {fmt(r['flash'])} | "
                     f"{fmt(r['memory-efficient'])} | {fmt(r['tflops'], '.0f')} |")
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", type=int, default=65536, help="batch x length (batch 8)")
    ap.add_argument("--sizes", default="90m,350m", help="comma list of " + ", ".join(s[0] for s in SIZES))
    ap.add_argument("--reps", type=int, default=5, help="timed runs per measurement on the CPU")
    ap.add_argument("--tune", action="store_true", help="also time tiles of the raw rotary kernels")
    ap.add_argument("--attention", action="store_true",
                    help="also time SDPA's backends for training (CUDA only)")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # Triton kernels run through the interpreter there
        os.environ.setdefault("TRITON_INTERPRET", "1")
    known = {s[0]: s for s in SIZES}
    for name in args.sizes.split(","):
        if name not in known:
            raise SystemExit(f"--sizes: unknown size {name!r} (known: {', '.join(known)})")
    if args.tokens % 8:
        raise SystemExit(f"--tokens must be a multiple of the batch, 8; got {args.tokens}")
    bench = timer(args.device, args.reps, graph=args.device == "cuda")
    header = environment(args.device, timer(args.device, args.reps))
    print("\n".join(header), flush=True)
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=args.device, dtype=dt)  # noqa: E731
    batch, length = 8, args.tokens // 8
    rows, tune_lines = [], []
    for name in args.sizes.split(","):
        _, d_model, n_head, hidden = known[name]
        qkv = rnd(batch, length, 3 * d_model).requires_grad_()
        douts = tuple(rnd(batch, length, n_head, d_model // n_head).transpose(1, 2) for _ in range(3))
        nb = 2 * qkv.numel() * 2
        rows.append(measure("rope", f"{batch} x {length} x 3 x {d_model}, {n_head} heads",
                            lambda be: op_fns(lambda t: qkv_rotary_fn(t, n_head, 0, 10000.0, be),
                                              qkv, douts), nb, nb, bench))
        if args.tune and args.device == "cuda":
            tune_lines += [f"{name} rope:"] + tune_rope(qkv.detach(), n_head, douts, bench)
        x = rnd(args.tokens, 2 * hidden).requires_grad_()
        dout = rnd(args.tokens, hidden)
        rows.append(measure("swiglu", f"{args.tokens} x 2 x {hidden}",
                            lambda be: op_fns(lambda t: swiglu_fn(t, be), x, dout), int(1.5 * x.numel() * 2),
                            int(2.5 * x.numel() * 2), bench))
    table = table_head("| op | shape (bf16) | fused fwd ms | GB/s | fused fwd+bwd ms | GB/s | "
                       "ref fwd ms | ref fwd+bwd ms | fwd+bwd speed-up | max rel diff |")
    for r in rows:
        table.append(f"| {r['op']} | {r['shape']} | {fmt(r['fwd'])} | {fmt(r['fwd_gbs'], '.0f')} | "
                     f"{fmt(r['fb'])} | {fmt(r['fb_gbs'], '.0f')} | {fmt(r['rfwd'])} | "
                     f"{fmt(r['rfb'])} | {fmt(r['rfb'] / r['fb'], '.1f')}x | {r['diff']:.1e} |")
    text = "\n".join(table)
    if args.attention and args.device == "cuda":
        text += ("\n\nCausal SDPA forward + backward, bf16, by backend (each allowed alone):\n\n"
                 + "\n".join(attention_rows(args.tokens, timer(args.device, args.reps))))
    print(text)
    if args.out:
        write_report(args.out, "Transformer element-wise ops: bytelm Triton vs the PyTorch references",
                     header, argv, [], text, tune_lines,
                     "Tiles of the raw rotary kernels (same run):")
    return rows


if __name__ == "__main__":
    main()
