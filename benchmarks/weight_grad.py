"""Time the Mamba's weight-gradient matmuls two ways: a bf16 result cast to fp32 (what autograd
does for an fp32 parameter under bf16 autocast) against `torch.mm(..., out_dtype=float32)`
(bytelm.ops.channel_major.weight_grad). CUDA only.

    python benchmarks/weight_grad.py                 # 90M and ~350M shapes, 65,536 positions
    python benchmarks/weight_grad.py --positions 32768

Shapes (out, positions) @ (positions, in) as the 90M / ~350M mixers make them: in_proj,
out_proj, x_proj, dt_proj. Medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, table_head, timer  # noqa: E402

# (name, out, in) of each weight; d_model, d_inner, dt_rank, d_state = 768, 1536, 48, 16 (90M)
# and 1024, 2048, 64, 16 (~350M)
WEIGHTS = {"90m": [("in_proj", 3072, 768), ("out_proj", 768, 1536), ("x_proj", 80, 1536),
                   ("dt_proj", 1536, 48)],
           "350m": [("in_proj", 4096, 1024), ("out_proj", 1024, 2048), ("x_proj", 96, 2048),
                    ("dt_proj", 2048, 64)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="90m,350m")
    ap.add_argument("--positions", type=int, default=65536, help="batch x length of a step")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("weight_grad.py: needs a CUDA GPU")
    bench = timer("cuda", 0)
    print("\n".join(environment("cuda", bench)), flush=True)
    lines = table_head("| size | weight | bf16 mm + .float() ms | mm out_dtype fp32 ms "
                       "| rel err to fp64: bf16 / fp32 |")
    bf = dict(device="cuda", dtype=torch.bfloat16)
    for size in args.sizes.split(","):
        for name, out, inp in WEIGHTS[size]:
            grad = torch.randn(out, args.positions, **bf)            # (out, positions)
            x = torch.randn(inp, args.positions, **bf).t()           # (positions, in) view
            exact = grad.double() @ x.double()
            t_cast = bench(lambda: (grad @ x).float())
            t_fp32 = bench(lambda: torch.mm(grad, x, out_dtype=torch.float32))
            errs = [((r.double() - exact).norm() / exact.norm()).item()
                    for r in ((grad @ x).float(), torch.mm(grad, x, out_dtype=torch.float32))]
            lines.append(f"| {size} | {name} ({out} x {args.positions} @ {args.positions} x {inp}) "
                         f"| {t_cast:.4f} | {t_fp32:.4f} | {errs[0]:.1e} / {errs[1]:.1e} |")
            print(lines[-1], flush=True)
            del grad, x, exact
    print("\n".join(lines))


if __name__ == "__main__":
    main()
