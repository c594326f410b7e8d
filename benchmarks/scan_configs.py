"""Time the raw scan kernels -- inference forward, training forward (with checkpoints) and
backward -- at their default configs or with config overrides, and compare the backward's
gradients with the default config's. The tool behind the option tables in NOTES.md (tenth
session): one line per shape.

    python benchmarks/scan_configs.py --label bc_fp32 --shapes 0,1,4 --fwd '{"bc_bf16": false}'
    python benchmarks/scan_configs.py --label us_row --bwd '{"us_row": true}'
    python benchmarks/scan_configs.py --shapes 4 --shape 6,1936,8192,16 --dout like-u

--fwd overrides forward_config (and so B and C's packing, which the backward reads where
its bc_bf16 asks for the same dtype); --bwd overrides backward_config (bc_bf16: the dtype the
backward reads B and C in). Shapes index benchmarks/scan.py's SHAPES; inputs are laid out
as the mixer hands them over (channel-major).
"""
import argparse, json, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import SHAPES, bench, make_inputs, rel_err, tss  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="default")
    ap.add_argument("--shapes", default="0,1,4,5,2", help="comma-separated indices into scan.py's SHAPES")
    ap.add_argument("--shape", action="append", default=[], metavar="B,D,L,N",
                    help="a shape of your own (batch, channels, length, state), after --shapes; repeatable")
    ap.add_argument("--fwd", default="{}", help="JSON overrides of forward_config")
    ap.add_argument("--bwd", default="{}", help="JSON overrides of backward_config")
    ap.add_argument("--dout", choices=["contiguous", "like-u"], default="contiguous",
                    help="the upstream gradient's layout: contiguous (scan.py's) or channel-major "
                         "like u (the mixer's: the backward's O_LIKE_U variant)")
    args = ap.parse_args()
    over_f, over_b = json.loads(args.fwd), json.loads(args.bwd)
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",") if i] + \
        [tuple(int(v) for v in s.split(",")) for s in args.shape]
    for i, (b, d, l, n) in enumerate(shapes):
        x = make_inputs(b, d, l, n, seed=i, layout="channel-major")
        dout = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)
        if args.dout == "like-u":
            dout = torch.empty_like(x["u"]).copy_(dout)   # u's strides (channel-major)
            assert dout.stride() == x["u"].stride()
        u, delta, A, D, z, bias = x["u"], x["delta"], x["A"], x["D"], x["z"], x["delta_bias"]
        f0 = tss.forward_config(n, b, d, l, u.device, input_dtype=u.dtype)
        cf, cb = dict(f0, **over_f), dict(tss.backward_config(n, b, d, u.device), **over_b)
        Bp, Cp = tss.pack_bc(x["B"], cf), tss.pack_bc(x["C"], cf)
        B0, C0 = tss.pack_bc(x["B"], f0), tss.pack_bc(x["C"], f0)
        # the backward's own B and C: the forward's packing where it reads that dtype, else
        # packed again (as SelectiveScanFn and the mixer do)
        Bb, Cb = tss.saved_bc(Bp, Cp, x["B"], x["C"], cb)
        if Bb is None:
            Bb, Cb = tss.pack_bc(x["B"], cb), tss.pack_bc(x["C"], cb)
        fwd = lambda ck: tss.scan_fwd(u, delta, A, Bp, Cp, D, z, bias, True, None, store_ckpt=ck, cfg=cf)  # noqa: E731
        ckpt = fwd(True)[2]
        bwd = lambda c, B=Bb, C=Cb: tss.scan_bwd(u, delta, A, B, C, D, z, bias, True, ckpt, cf["T"],  # noqa: E731
                                                 dout, None, False, cfg=c)
        err = max(rel_err(a, r) for a, r in zip(bwd(cb)[:5], bwd(None, B0, C0)[:5]))
        fi, fc, bw = bench(lambda: fwd(False)), bench(lambda: fwd(True)), bench(lambda: bwd(cb))
        print(f"{args.label:8s} {b} x {d} x {l}, N={n}: fwd {fi:.3f}  fwd+ckpt {fc:.3f}  bwd {bw:.3f} ms "
              f"(dout {args.dout}; fwd overrides {over_f}, bwd {cb}; gradients vs the default config {err:.1e})", flush=True)
        del x, dout, ckpt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
