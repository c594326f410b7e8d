"""The scan's chunk checkpoints in bf16 or fp32: what they cost in memory, what bf16 costs in accuracy.

    python benchmarks/scan_ckpt.py memory      # bytes at the throughput table's shapes (arithmetic)
    python benchmarks/scan_ckpt.py accuracy    # gradients vs float64, both checkpoint dtypes

`accuracy` runs the kernels (Triton's interpreter without a GPU, so tiny shapes: the tests'
SMALL / LONG) and the float64 reference on the same inputs, once with fp32 and once with bf16
checkpoints, and prints each result's relative error (||ours - ref|| / ||ref||), the relative
change bf16 checkpoints make (||ours_bf16 - ours_fp32|| / ||ref||), and the error of the exact
result rounded to bf16: the floor for any gradient stored in bf16. Triton's interpreter casts
fp32 -> bf16 by truncation where the GPU rounds to nearest even (cvt.rn), which doubles and
biases the error of every bf16 result (outputs, gradients, checkpoints); `--rounding nearest`
(the default) makes the interpreter round like the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from bytelm.models.lm import ModelConfig  # noqa: E402
from bytelm.ops.triton import selective_scan as tss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def memory(batch=8, length=8192):
    """The checkpoints' bytes per layer and per model for throughput.py's Mamba sizes; the last
    column is a form not implemented (its backward would need T = 8 chunks or a recomputed chunk:
    NOTES.md), for scale."""
    from throughput import SIZES
    print(f"chunk checkpoints at {batch} x {length} (GB = 1e9 B; T = {tss.scan_config(16)['T']} steps a chunk)")
    print("| model | layers | d_inner x N | fp32 per layer | bf16 per layer | fp32 all layers "
          "| bf16 all layers | saved | bf16 every 8 steps, all layers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (mamba, _) in SIZES.items():
        cfg = ModelConfig(**mamba)
        dim, nstate = cfg.expand * cfg.d_model, cfg.d_state
        per = {k: tss.checkpoint_nbytes(batch, dim, length, nstate, tss.scan_config(nstate, input_dtype=v))
               for k, v in DTYPES.items()}
        total = {k: v * cfg.n_layer for k, v in per.items()}
        every8 = cfg.n_layer * tss.checkpoint_nbytes(
            batch, dim, length, nstate, dict(tss.scan_config(nstate, input_dtype=torch.bfloat16), T=8))
        print(f"| {name} | {cfg.n_layer} | {dim} x {nstate} | {per['fp32'] / 1e9:.2f} GB "
              f"| {per['bf16'] / 1e9:.2f} GB | {total['fp32'] / 1e9:.1f} GB | {total['bf16'] / 1e9:.1f} GB "
              f"| {(total['fp32'] - total['bf16']) / 1e9:.1f} GB | {every8 / 1e9:.1f} GB |")


def gradients_with(ckpt_dtype, *case):
    """scan_vs_reference (tests/test_triton_scan.py) with the forward's checkpoints in ckpt_dtype."""
    import test_triton_scan as t
    config = tss.scan_config
    tss.scan_config = lambda *a, **k: dict(config(*a, **k), ckpt_dtype=ckpt_dtype)
    try:
        return t.scan_vs_reference(*case)
    finally:
        tss.scan_config = config


def accuracy(lengths, nstates, dtypes, seeds):
    import test_triton_scan as t
    from kernel_checks import rel_err
    print("| input | length | N | result | fp32 ckpt | bf16 ckpt | bf16 - fp32 ckpt | exact rounded to bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in dtypes:
        for length in lengths:
            shape = t.SMALL if length <= 64 else t.LONG
            for nstate in nstates:
                errs = {}
                for seed in seeds:
                    case = (*shape, length, nstate, DTYPES[dtype], 1000 * length + nstate + seed)
                    _, ours32, ref = gradients_with(torch.float32, *case)
                    _, ours16, _ = gradients_with(torch.bfloat16, *case)
                    for key in ref:
                        e = (rel_err(ours32[key], ref[key]), rel_err(ours16[key], ref[key]),
                             rel_err(ours16[key], ours32[key], ref[key].detach().norm()),
                             rel_err(ref[key].to(torch.bfloat16), ref[key]))
                        errs[key] = [max(a, b) for a, b in zip(errs.get(key, e), e)]
                for key, (e32, e16, change, floor) in errs.items():
                    print(f"| {dtype} | {length} | {nstate} | {key} | {e32:.1e} | {e16:.1e} | {change:.1e} "
                          f"| {floor:.1e} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["memory", "accuracy"])
    ap.add_argument("--lengths", default="1,63,1000")
    ap.add_argument("--nstates", default="16,64")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--seeds", type=int, default=3, help="cases per row; the row shows the largest error")
    ap.add_argument("--rounding", choices=["nearest", "truncate"], default="nearest",
                    help="the interpreter's fp32 -> bf16 casts: as the GPU's, or its own truncation")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1" and args.rounding == "nearest":
        from kernel_checks import round_bf16_like_the_gpu
        round_bf16_like_the_gpu()
    if args.what == "memory":
        memory()
    else:
        accuracy([int(v) for v in args.lengths.split(",")], [int(v) for v in args.nstates.split(",")],
                 args.dtypes.split(","), range(args.seeds))


if __name__ == "__main__":
    main()
