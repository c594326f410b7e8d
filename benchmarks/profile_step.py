"""Where a training step's GPU time goes: torch.profiler over a few steps of one model.

Builds the same models as benchmarks/throughput.py (bf16 autocast, fused AdamW, eager), runs
warm-up steps, profiles a few more and prints the CUDA kernels that take the most time, then the
same time grouped into coarse families (GEMM, scan, conv, elementwise/copy, norm, optimizer, ...).

    python benchmarks/profile_step.py                                 # 90M Mamba, 8 x 8192
    python benchmarks/profile_step.py --model Transformer --context 2048 --top 30
    python benchmarks/profile_step.py --trace /tmp/step.json          # chrome://tracing file
    python benchmarks/profile_step.py --gaps 15                       # + where the GPU idles

--gaps N: the GPU's idle time between its activities (kernels, memsets, copies) over the
profiled steps, a histogram of the gaps and the N longest with the activities either side.
The CUDA activity alone is profiled then, so that the profiler's CPU-side bookkeeping does not
slow the host into the gaps (and a --trace then holds no CPU events).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bytelm.models.lm import LM, ModelConfig  # noqa: E402
from throughput import CONTEXTS, MAMBA2, SIZES, training_loss  # noqa: E402

# first matching pattern (on the lower-cased kernel name) names the family
FAMILIES = [
    ("ssd (triton)", r"_ssd_"),
    ("scan (triton)", r"_scan_|_state_update"),
    ("attention", r"sdpa|flash|fmha|attention|cudnn::fusion"),  # (cuDNN's dq cast, dot(do, o))
    ("rope / swiglu (triton)", r"_rotary_|_swiglu_"),
    ("conv1d", r"conv"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|matmul|_mma|cublas"),
    ("norm", r"norm"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("softmax / loss", r"softmax|nll|cross_entropy|log_softmax"),
    ("copy / layout", r"copy|transpose|cat|contiguous|direct_copy|gather|scatter|index"),
    ("reduction", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|mul|add|exp"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="90m", choices=sorted(SIZES))
    p.add_argument("--model", default="Mamba", choices=["Mamba", "Mamba-2", "Transformer"])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, help="default: 65,536 bytes per step")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="triton", help="Mamba scan backend")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="also export a chrome trace here")
    p.add_argument("--cuda-graph", action="store_true",
                   help="forward and backward replayed from CUDA graphs (train.cuda_graph)")
    p.add_argument("--gaps", type=int, default=0, metavar="N",
                   help="also the GPU's idle time between kernels, and the N longest gaps")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/profile_step.py needs a CUDA GPU")

    batch = args.batch or CONTEXTS.get(args.context, max(1, 65536 // args.context))
    kw = (MAMBA2[args.size] if args.model == "Mamba-2"
          else SIZES[args.size][0 if args.model == "Mamba" else 1])
    torch.manual_seed(0)
    model = LM(ModelConfig(**kw, scan_backend=args.backend)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(0, 256, (batch, args.context + 1), device="cuda")

    loss_of = training_loss(model, args.cuda_graph)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    if not args.gaps:
        acts.insert(0, torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(args.trace)

    # device time per kernel, from the raw events (key_averages' column names vary by version)
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = getattr(ev, "device_time", None)
            t = ev.cuda_time if t is None else t
            per_kernel[ev.name][0] += t
            per_kernel[ev.name][1] += 1
    total = sum(v[0] for v in per_kernel.values())
    print(f"{args.model} {args.size}, batch {batch} x {args.context}, {args.steps} steps: "
          f"{total / 1e3 / args.steps:.1f} ms of GPU kernel time per step "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("| kernel | family | calls/step | ms/step | share |\n| --- | --- | --- | --- | --- |")
    for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {family(name)} | {n / args.steps:.0f} | {t / 1e3 / args.steps:.2f} "
              f"| {100 * t / total:.1f}% |")
    fams: dict[str, float] = defaultdict(float)
    for name, (t, _) in per_kernel.items():
        fams[family(name)] += t
    print("\n| family | ms/step | share |\n| --- | --- | --- |")
    for fam, t in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {t / 1e3 / args.steps:.2f} | {100 * t / total:.1f}% |")
    if args.gaps:
        print_gaps(prof, args.steps, args.gaps)


def print_gaps(prof, steps: int, top: int):
    """Idle GPU time: the stretches with no activity running (overlapping activities, e.g. on a
    second stream, count as busy until the last of them ends)."""
    acts = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                  if ev.device_type == torch.autograd.DeviceType.CUDA)
    gaps, busy_until, last = [], acts[0][1], acts[0][2]
    for start, end, name in acts[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, last, name))
        if end >= busy_until:
            busy_until, last = end, name
    span = busy_until - acts[0][0]
    idle = sum(g for g, _, _ in gaps)
    print(f"\n{len(acts) / steps:.0f} GPU activities a step; span {span / 1e3 / steps:.1f} ms a "
          f"step, idle between them {idle / 1e3 / steps:.2f} ms a step")
    edges = [0, 2, 5, 10, 50, 200, 1000, float("inf")]
    print("\n| gap (us) | gaps a step | idle ms a step |\n| --- | --- | --- |")
    for lo, hi in zip(edges, edges[1:]):
        sel = [g for g, _, _ in gaps if lo <= g < hi]
        print(f"| {lo}-{hi} | {len(sel) / steps:.0f} | {sum(sel) / 1e3 / steps:.2f} |")
    print("\n| longest gaps (us) | activity before | activity after |\n| --- | --- | --- |")
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        print(f"| {g:.1f} | `{a[:60]}` | `{b[:60]}` |")


if __name__ == "__main__":
    main()
