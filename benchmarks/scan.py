"""Time bytelm's fused Triton selective scan against mamba_ssm's CUDA scan and our reference.

    python benchmarks/scan.py                         # the PERF.md shapes, table on stdout
    python benchmarks/scan.py --peer-src .peer/selective_scan --out benchmarks/results/scan-h200.md

bf16 u/delta/z/B/C, fp32 A/D/delta_bias, z gating and softplus on (the PERF.md setting); medians of
triton.testing.do_bench. "fwd" is an inference forward (no checkpoints stored); "fwd+bwd" is a
training step of the op: forward with checkpoints, then the backward for a fixed upstream
gradient. "peak MiB" is the memory fwd+bwd allocates on top of its inputs (grads included).

The peer is mamba_ssm 2.3.2.post1's selective_scan_cuda: either an already built extension
(--peer-so) or one compiled here from its csrc/selective_scan sources (--peer-src; bf16 and real
weights only, sm_90, ~2 min). It is skipped cleanly when neither is given or the build fails.

Floor (PERF.md): per (batch, channel, step) the forward must move 8 bytes (read u, delta, z, write
y in bf16; B and C are shared by all channels) and evaluate N + 4 special functions (N decays
exp(dt * A), softplus's exp and log, SiLU's exp and reciprocal):
    floor = max(8 * b * d * l / copy_bandwidth,  (N + 4) * b * d * l / sfu_rate)
with copy_bandwidth measured here (device-to-device copy, bytes read + written) and
sfu_rate = SMs * 16 special-function results per clock * 1.98 GHz (H200 boost clock).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bytelm.ops.selective_scan import selective_scan_ref  # noqa: E402
from bytelm.ops.triton import selective_scan as tss  # noqa: E402
from common import copy_bandwidth, fmt, rel_err, table_head  # noqa: E402

SHAPES = [(8, 2048, 2048, 16), (4, 2048, 8192, 16), (8, 2048, 2048, 64), (2, 1536, 8192, 16),
          (8, 1536, 8192, 16),   # the 90M Mamba's scan in its 8 x 8192 training step
          (2, 1536, 32768, 16)]  # and in its 2 x 32768 one: few channels, the sequence in pieces
PEER_NVCC_FLAGS = [  # mamba_ssm's setup.py flags, for sm_90 alone
    "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    "-gencode=arch=compute_90,code=sm_90",
]


# ------------------------------------------------------------------------------------------
# the peer
# ------------------------------------------------------------------------------------------
def _only_branch(src: str, macro: str, scalar: str, ctype: str, alias: str) -> str:
    """Rewrite one of selective_scan.cpp's dispatch macros to a single type (fewer kernels)."""
    start = src.index(f"#define {macro}(")
    end = start
    while src[end:src.index("\n", end)].rstrip().endswith("\\"):
        end = src.index("\n", end) + 1
    end = src.index("\n", end)
    arg = src[start:src.index(",", start)].split("(")[1]
    body = (f"#define {macro}({arg}, NAME, ...) \\\n"
            f"    if ({arg} == at::ScalarType::{scalar}) {{ using {alias} = {ctype}; __VA_ARGS__(); }} \\\n"
            f"    else {{ AT_ERROR(#NAME, \" built for {ctype} only (bytelm benchmark)\"); }}")
    return src[:start] + body + src[end:]


def build_peer(src: Path, build: Path):
    """Compile mamba_ssm's selective scan (bf16 inputs, fp32 weights, sm_90) as selective_scan_cuda."""
    from torch.utils.cpp_extension import load
    build.mkdir(parents=True, exist_ok=True)
    cpp = (src / "selective_scan.cpp").read_text()
    cpp = _only_branch(cpp, "DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16", "BFloat16", "at::BFloat16", "input_t")
    cpp = _only_branch(cpp, "DISPATCH_WTYPE_FLOAT_AND_COMPLEX", "Float", "float", "weight_t")
    (build / "selective_scan.cpp").write_text(cpp)
    (build / "fwd_bf16.cu").write_text(
        '#include "selective_scan_fwd_kernel.cuh"\n'
        "template void selective_scan_fwd_cuda<at::BFloat16, float>(SSMParamsBase &, cudaStream_t);\n")
    (build / "bwd_bf16.cu").write_text(
        '#include "selective_scan_bwd_kernel.cuh"\n'
        "template void selective_scan_bwd_cuda<at::BFloat16, float>(SSMParamsBwd &, cudaStream_t);\n")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return load(name="selective_scan_cuda",
                sources=[str(build / f) for f in ("selective_scan.cpp", "fwd_bf16.cu", "bwd_bf16.cu")],
                extra_include_paths=[str(src)], extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=PEER_NVCC_FLAGS, build_directory=str(build), verbose=False)


def load_peer(so: Path):
    loader = importlib.machinery.ExtensionFileLoader("selective_scan_cuda", str(so))
    spec = importlib.machinery.ModuleSpec("selective_scan_cuda", loader, origin=str(so))
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def peer_fwd(mod, u, delta, A, B, C, D, z, bias):
    """mamba_ssm's SelectiveScanFn.forward: (out_z, saved) with B, C given a group axis."""
    out, x, out_z = mod.fwd(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, bias, True)
    return out_z, (out, x)


def peer_fwd_bwd(mod, u, delta, A, B, C, D, z, bias, dout):
    out_z, (out, x) = peer_fwd(mod, u, delta, A, B, C, D, z, bias)
    return mod.bwd(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, bias, dout, x, out, None,
                   True, False)


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------
def make_inputs(b, d, l, n, seed=0, layout="contiguous"):
    """bf16 inputs, (batch, dim, length) contiguous, or with layout="channel-major" views of
    (dim, batch, length) storage with z half of a (2 dim, batch, length) tensor and B, C the
    rows of one (2 state, batch, length) tensor (x_proj's output): the layout the mixer hands the
    scan (the peer gets contiguous copies: its kernel wants them)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    rnd = lambda *s, **kw: torch.randn(*s, generator=g, device="cuda", **kw)  # noqa: E731
    x = dict(u=rnd(b, d, l).to(**bf), delta=(0.5 * rnd(b, d, l)).to(**bf),
             A=-(torch.rand(d, n, generator=g, device="cuda") * 4 + 0.1),
             B=rnd(b, n, l).to(**bf), C=rnd(b, n, l).to(**bf), D=rnd(d),
             z=rnd(b, d, l).to(**bf), delta_bias=0.5 * rnd(d))
    if layout == "channel-major":
        for k in ("u", "delta"):
            x[k] = x[k].transpose(0, 1).contiguous().transpose(0, 1)
        xz = torch.cat([x["u"].transpose(0, 1), x["z"].transpose(0, 1)])
        x["z"] = xz[d:].transpose(0, 1)
        bc = torch.cat([x["B"].transpose(0, 1), x["C"].transpose(0, 1)])
        x["B"], x["C"] = bc[:n].transpose(0, 1), bc[n:].transpose(0, 1)
    return x


def bench(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def sfu_rate():
    return torch.cuda.get_device_properties(0).multi_processor_count * 16 * 1.98e9


def floor_ms(b, d, l, n, bw):
    elems = b * d * l
    return max(8 * elems / bw, (n + 4) * elems / sfu_rate()) * 1e3


def ours_fns(x, dout):
    def fwd():
        with torch.no_grad():
            return tss.selective_scan_triton(**x, delta_softplus=True)

    def fwd_bwd():
        xs = {k: v.detach().requires_grad_() for k, v in x.items()}
        out = tss.selective_scan_triton(**xs, delta_softplus=True)
        return torch.autograd.grad(out, list(xs.values()), dout)
    return fwd, fwd_bwd


def ref_fns(x, dout):
    def fwd():
        with torch.no_grad():
            return selective_scan_ref(**x, delta_softplus=True)

    def fwd_bwd():
        xs = {k: v.detach().requires_grad_() for k, v in x.items()}
        out = selective_scan_ref(**xs, delta_softplus=True)
        return torch.autograd.grad(out, list(xs.values()), dout)
    return fwd, fwd_bwd


def tune(x, dout, n):
    """Time the raw kernels for a few tile shapes and sequence cuts; one line per variant."""
    u, delta, A, D, z, bias = x["u"], x["delta"], x["A"], x["D"], x["z"], x["delta_bias"]
    base_f = tss.scan_config(n, input_dtype=u.dtype)
    Bp, Cp = tss.pack_bc(x["B"], base_f), tss.pack_bc(x["C"], base_f)
    _, _, ckpt = tss.scan_fwd(u, delta, A, Bp, Cp, D, z, bias, True, None, store_ckpt=True)
    base_b = tss.backward_config(n, u.shape[0], u.shape[1], u.device)
    # B and C as a backward config reads them: its state split, its dtype (bc_bf16)
    packed = lambda cfg: (tss.pack_bc(x["B"], cfg), tss.pack_bc(x["C"], cfg))  # noqa: E731
    Bb, Cb = packed(base_b)
    bwd = lambda cfg, ck=ckpt: tss.scan_bwd(u, delta, A, Bb, Cb, D, z, bias, True, ck,  # noqa: E731
                                            base_f["T"], dout, None, False, cfg=cfg)
    ref_grads = bwd(dict(base_b, SEG=1))
    def pieces(cfg):  # pieces as launched, and the pre-pass's sub-pieces a piece
        n, _, sub, _ = tss._pieces(u.shape[0], u.shape[1], ckpt.shape[1], cfg, u.device)
        return f"{n} x {sub}" if n > 1 else "1"

    lines = []
    # the chunk loop: pipelined (two chunks an iteration) or one chunk (rows prefetched), each
    # with and without checkpoints; the default picks per case
    piped = dict(base_f, pipeline=True, pipeline_ckpt=True)
    one_chunk = dict(base_f, pipeline=False, pipeline_ckpt=False)
    fwd_variants = [base_f, piped, one_chunk, dict(base_f, SEG=1),
                    dict(piped, WD=3 - base_f["WD"]), dict(one_chunk, WD=3 - base_f["WD"]),
                    dict(base_f, maxnreg=168, warps_per_sm=12),  # more warps an SM to hide latency
                    dict(piped, ckpt_dtype=torch.float32),  # the checkpoints bf16 inputs had before
                    dict(one_chunk, ckpt_dtype=torch.float32)]
    half = dict(NPT=4, KN=4, LD=8) if base_f["NPT"] == 8 and base_f["KN"] == 2 else {}
    if half:  # half the states a thread: twice the programs; forward_config's pick, and the
        # training forward in pairs and in quads (four chunks an iteration)
        fwd_variants += [dict(base_f, **half), dict(one_chunk, **half),
                         tss.forward_config(n, *u.shape, u.device, input_dtype=u.dtype),
                         dict(base_f, **half, quads_ckpt=True), dict(base_f, **half, quads_ckpt=False)]
    if base_f["KN"] % base_f["T"] == 0 or half:  # the per-(step, channel) work one step a lane or not
        flip = dict(lane_steps=not base_f["lane_steps"], lane_steps_ckpt=not base_f["lane_steps_ckpt"])
        fwd_variants += [dict(base_f, **half, **flip), dict(one_chunk, **half, **flip)]
    fwd_variants = [c for i, c in enumerate(fwd_variants) if c not in fwd_variants[:i]]
    for cfg in fwd_variants:
        # the training forward also writes the chunk checkpoints: time both
        ms = [bench(lambda: tss.scan_fwd(u, delta, A, Bp, Cp, D, z, bias, True, None, store_ckpt=ck, cfg=cfg))
              for ck in (False, True)]
        lines.append(f"  fwd {cfg} ({pieces(cfg)} pieces x sub-pieces): {ms[0]:.3f} ms, {ms[1]:.3f} ms with checkpoints")
    capped = tss.scan_config(n, backward=True)   # the cap scan_config gives this state size

    def cap(**kw):  # another register cap, B and C in the dtype backward_config reads them in
        # there: scan_config's own at its cap, bf16 at any other (backward_config's branches)
        same = kw.get("maxnreg") is not None and kw.get("maxnreg") == capped.get("maxnreg")
        return dict(base_b, **kw, bc_bf16=capped["bc_bf16"] if same else True)

    variants = [base_b, dict(base_b, SEG=1), dict(base_b, SEG=2), dict(base_b, SEG=4),
                dict(base_b, reduce_scatter=False)]  # dB/dC by a full butterfly per value
    if base_b.get("maxnreg"):  # without the register cap (8 warps an SM)
        variants += [cap(maxnreg=None, warps_per_sm=8),
                     cap(maxnreg=None, warps_per_sm=8, reduce_scatter=False)]
    elif capped.get("maxnreg"):  # with it
        variants += [cap(maxnreg=capped["maxnreg"], warps_per_sm=capped["warps_per_sm"])]
    log_ld = base_b["LD"].bit_length() - 1  # fewer reduce-scatter rounds for dB/dC, more atomics
    variants += [dict(base_b, rs_rounds=r) for r in range(log_ld - 1, -1, -1)]
    if u.dtype == torch.bfloat16:  # B and C in the other dtype (fp32 inputs pack fp32 either way)
        variants.append(dict(base_b, bc_bf16=not base_b["bc_bf16"]))
    if base_b["KN"] % base_b["T"] == 0:  # the per-(step, channel) work in every lane, not once
        variants.append(dict(base_b, lane_steps=False))
    if n == 16:  # register caps: 128 (16 warps an SM), 168 (12), none (triton 3.6: 139 registers
        # before the state-lane reduce-scatter, 14 warps an SM; 168 since, 12)
        variants += [cap(maxnreg=128, warps_per_sm=16), cap(maxnreg=168, warps_per_sm=12),
                     cap(maxnreg=None, warps_per_sm=14), cap(maxnreg=128, warps_per_sm=16, SEG=1)]
    if base_b["NPT"] in (4, 8) and base_b["LD"] > 1:  # half the states a thread: twice the programs
        variants.append(dict(base_b, NPT=base_b["NPT"] // 2, KN=base_b["KN"] * 2, LD=base_b["LD"] // 2))
    variants = [c for i, c in enumerate(variants) if c not in variants[:i]]
    for cfg in variants:
        if cfg["NPT"] != base_b["NPT"] or tss.bc_dtype(cfg, u.dtype) != tss.bc_dtype(base_b, u.dtype):
            Bq, Cq = packed(cfg)
            f = lambda: tss.scan_bwd(u, delta, A, Bq, Cq, D, z, bias, True, ckpt, base_f["T"],  # noqa: E731
                                     dout, None, False, cfg=cfg)
            # another state split packs dB and dC differently: the other gradients alone
            k = 3 if cfg["NPT"] != base_b["NPT"] else 5
            err = max(rel_err(a, b) for a, b in zip(f()[:k], ref_grads[:k]))
        else:
            f = lambda: bwd(cfg)  # noqa: E731
            err = max(rel_err(a, b) for a, b in zip(f()[:5], ref_grads[:5]))
        lines.append(f"  bwd {cfg} ({pieces(cfg)} pieces x sub-pieces): {bench(f):.3f} ms (max rel diff {err:.1e})")
    # the default backward reading fp32 checkpoints (bf16 inputs' default until bf16 ones)
    ckpt32 = tss.scan_fwd(u, delta, A, Bp, Cp, D, z, bias, True, None, store_ckpt=True,
                          cfg=dict(base_f, ckpt_dtype=torch.float32))[2]
    f = lambda: bwd(base_b, ckpt32)  # noqa: E731
    err = max(rel_err(a, b) for a, b in zip(f()[:5], ref_grads[:5]))
    lines.append(f"  bwd {base_b} ({pieces(base_b)} pieces x sub-pieces) on fp32 checkpoints: {bench(f):.3f} ms "
                 f"(max rel diff {err:.1e})")
    print("\n".join(lines), flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-so", type=Path, help="an already built selective_scan_cuda extension")
    ap.add_argument("--peer-src", type=Path, help="mamba_ssm's csrc/selective_scan, to build the peer")
    ap.add_argument("--peer-build", type=Path, default=Path("/tmp/bytelm_peer_build"))
    ap.add_argument("--build-peer-only", action="store_true")
    ap.add_argument("--tune", action="store_true", help="also time a few tile shapes of the raw kernels")
    ap.add_argument("--shapes", default="all", help="'all' or comma-separated indices into SHAPES")
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "channel-major"],
                    help="how our kernels get u, delta, z, B, C (channel-major: the mixer's)")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    ap.add_argument("--profile-once", type=int, metavar="SHAPE",
                    help="run one forward and one forward+backward of SHAPES[i] (for ncu) and exit")
    args = ap.parse_args()

    peer = None
    if args.peer_so and args.peer_so.exists():
        peer = load_peer(args.peer_so)
    elif args.peer_src:
        t0 = time.time()
        try:
            peer = build_peer(args.peer_src, args.peer_build)
            print(f"built the peer in {time.time() - t0:.0f} s: {peer.__file__}", flush=True)
        except Exception as e:  # a failed peer build must not cost the rest of the run
            print(f"peer build failed after {time.time() - t0:.0f} s: {e!r}"[:2000], flush=True)
    if args.build_peer_only:
        return

    if args.profile_once is not None:
        b, d, l, n = SHAPES[args.profile_once]
        x = make_inputs(b, d, l, n, layout=args.layout)
        fwd, fwd_bwd = ours_fns(x, torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16))
        for fn in (fwd, fwd_bwd, fwd, fwd_bwd):  # the first pair compiles
            fn()
        torch.cuda.synchronize()
        return

    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(bench)
    print(f"{props.name}: copy bandwidth {bw / 1e9:.0f} GB/s, SFU rate {sfu_rate() / 1e12:.2f}e12/s",
          flush=True)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows, tune_lines = [], []
    for i, (b, d, l, n) in enumerate(shapes):
        x = make_inputs(b, d, l, n, seed=i, layout=args.layout)
        dout = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)
        fwd, fwd_bwd = ours_fns(x, dout)
        row = dict(shape=f"{b} x {d} x {l}, N={n}", floor=floor_ms(b, d, l, n, bw))
        row["fwd"], row["fb"] = bench(fwd), bench(fwd_bwd)
        row["mem"] = peak_mib(fwd_bwd)
        if peer is not None:
            args_p = [x[k].contiguous() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
            out_p, _ = peer_fwd(peer, *args_p)
            row["check"] = rel_err(fwd(), out_p)
            row["pfwd"] = bench(lambda: peer_fwd(peer, *args_p))
            row["pfb"] = bench(lambda: peer_fwd_bwd(peer, *args_p, dout))
            row["pmem"] = peak_mib(lambda: peer_fwd_bwd(peer, *args_p, dout))
        if i == 0:  # the reference holds (length, batch, dim, state) fp32 tensors: first shape only
            rfwd, rfb = ref_fns(x, dout)
            try:
                row["rfwd"] = bench(rfwd, rep=500)
                row["rfb"] = bench(rfb, rep=500)
            except torch.OutOfMemoryError:
                row["rfwd"] = row.get("rfwd", float("nan"))
            torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
        if args.tune:
            print(f"tuning {row['shape']}:", flush=True)
            tune_lines += [f"{row['shape']}:"] + tune(x, dout, n)
        del x, dout
        torch.cuda.empty_cache()

    table = format_table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report(table, props, tune_lines))


def format_table(rows):
    head = ("| shape | ours fwd ms | peer fwd ms | fwd ours/peer | floor ms | floor/ours fwd "
            "| ours fwd+bwd ms | peer fwd+bwd ms | fwd+bwd ours/peer | ours peak MiB | peer peak MiB "
            "| ref fwd ms | ref fwd+bwd ms | out vs peer |")
    lines = table_head(head)
    for r in rows:
        pf, pfb = r.get("pfwd"), r.get("pfb")
        lines.append("| " + " | ".join([
            r["shape"], fmt(r["fwd"]), fmt(pf), fmt(r["fwd"] / pf if pf else None, ".2f"),
            fmt(r["floor"]), fmt(r["floor"] / r["fwd"], ".2f"), fmt(r["fb"]), fmt(pfb),
            fmt(r["fb"] / pfb if pfb else None, ".2f"), fmt(r["mem"], ".0f"), fmt(r.get("pmem"), ".0f"),
            fmt(r.get("rfwd"), ".1f"), fmt(r.get("rfb"), ".1f"), fmt(r.get("check"), ".1e"),
        ]) + " |")
    return "\n".join(lines)


def report(table, props, tune_lines):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    args = [re.sub(r"^/.*?/(\.peer/)", r"\1", a) for a in sys.argv[1:]]  # paths as in the repo
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + args)
    parts = [
        "# Selective scan on the H200: bytelm Triton vs mamba_ssm CUDA",
        "",
        f"- GPU: {props.name} ({props.multi_processor_count} SMs); nvidia-smi: {smi}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{cmd}`",
        "- bf16 u/delta/z/B/C, fp32 A/D/delta_bias, z gate and softplus on; medians of "
        "triton.testing.do_bench; peer = mamba_ssm 2.3.2.post1 selective_scan_cuda built from its "
        "sdist for sm_90 in the same run; floor and peak memory as defined in benchmarks/scan.py.",
        "",
        table,
    ]
    if tune_lines:
        parts += ["", "Tile-shape variants of the raw kernels (same run):", "", "```"] + tune_lines + ["```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
