"""Offline SASS statistics of the scan kernels for sm_90 (no GPU): the launch arguments that
`scan_bwd` / `scan_fwd` would pass for the Mamba mixer's channel-major case are captured with a
stub kernel, specialised the way Triton's launcher does (ints equal to 1 -> constexpr, multiples
of 16 -> divisibility), compiled with triton.compile for GPUTarget("cuda", 90, 32), and the cubin
is read with the wheel's cuobjdump.

    PYTHONPATH=. python benchmarks/sass_bwd.py [--nstate 16 64] [--fwd] [--ckpt-dtype fp32] [--dump DIR]

--fwd adds the forward with checkpoints (the training forward) in both its loops (fwd-pipelined,
fwd-one-chunk; scan_config's pipeline_ckpt picks one per N), without them (fwd-infer) and the
forward's one-chunk pre-pass (fwd-infer-seg, `_scan_fwd_segment_kernel`: launched when the
sequence is cut into pieces and the tile has no chunk pairs) and, at N=16, the training forward
capped at 168 registers (fwd-capped: forward_config's short batches until the thirteenth
session), with 4 states a thread in chunk pairs (fwd-npt4) and quads (fwd-npt4-quads:
forward_config's launches that fit at 12 warps an SM, and short batches), and that tile's
pre-pass in quads (fwd-npt4-quads-pieces-pre: `_scan_fwd_kernel` with PRE); and the backward's
pre-pass (bwd-seg). stg_kinds / ldg_kinds: the main loop's global stores / loads by width (U16:
2 bytes, 32: 4, 64, 128 bits).
"""
import argparse, os, re, subprocess, tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import bytelm.ops.triton.selective_scan as S
import bytelm.ops.triton.selective_scan_kernels as K

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump"


class _Capture:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
        return launch


def compile_captured(fn, args, kwargs):
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=TARGET, options=options.__dict__)


def sass_stats(k):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    lines = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", l)]
    ops = [re.sub(r"^\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?", "", l).split()[0] for l in lines]
    # the main loop: the longest backward branch's body (target address <= its own address)
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4,})\*/", l).group(1), 16) for l in lines]
    best = (0, 0)
    for i, l in enumerate(lines):
        b = re.search(r"BRA\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)", l)
        if b:
            tgt = int(b.group(1), 16)
            if tgt < addr[i] and addr[i] - tgt > best[1] - best[0]:
                best = (tgt, addr[i])
    loop = [o for a, o in zip(addr, ops) if best[0] <= a <= best[1]]
    cnt = lambda seq, p: sum(1 for o in seq if o.startswith(p))

    def kinds(p):  # the loop's global loads / stores by width: "U16:16,128:2" (E alone: 32-bit)
        ops_p = sorted(set(o for o in loop if o.startswith(p + ".")))
        return ",".join(f"{o.removeprefix(p + '.E').lstrip('.') or '32'}:{loop.count(o)}" for o in ops_p)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)),
                total=len(ops), loop=len(loop),
                loop_shfl=cnt(loop, "SHFL"), loop_atom=cnt(loop, "RED") + cnt(loop, "ATOM"),
                loop_mufu=cnt(loop, "MUFU"), loop_bar=cnt(loop, "BAR"), loop_sts=cnt(loop, "STS"),
                loop_lds=cnt(loop, "LDS"), loop_ldg=cnt(loop, "LDG"), loop_stg=cnt(loop, "STG"),
                loop_ffma=cnt(loop, "FFMA"), loop_fadd=cnt(loop, "FADD"), loop_fmul=cnt(loop, "FMUL"),
                loop_mov=cnt(loop, "MOV"), loop_sel=cnt(loop, "FSEL") + cnt(loop, "SEL"),
                stg_kinds=kinds("STG"), ldg_kinds=kinds("LDG")), sass, k.asm["ttgir"]


def capture(nstate, batch=8, dim=1536, length=1024, cfg_bwd=None, ckpt_dtype=None, bwd_over=None,
            bc_bf16=False):
    """Run scan_fwd / scan_bwd on CPU tensors shaped like the mixer's (channel-major storage)
    with the kernels stubbed; returns the captured launches by label. ckpt_dtype overrides the
    checkpoints' dtype (default: scan_config's for the mixer's bf16 inputs). The backward is
    captured as scan_bwd picks it for this shape (cfg_bwd None: backward_config; CPU tensors,
    so one piece, scan_config's cap) and, where scan_config has a register cap, at
    backward_config's other cap as well (128 registers: grids over 12 warps an SM). bwd_over:
    keys to override in both backward configs (e.g. rs_rounds). bc_bf16: B and C packed in bf16."""
    bf = torch.bfloat16
    def cm(nch, dtype=bf):  # (channels, batch * length) storage viewed (batch, channels, length)
        return torch.zeros(nch, batch * length, dtype=dtype).view(nch, batch, length).transpose(0, 1)
    xz = torch.zeros(2 * dim, batch * length, dtype=bf)
    z = xz[dim:].view(dim, batch, length).transpose(0, 1)
    u, delta, dout = cm(dim), cm(dim), cm(dim)
    A = torch.zeros(dim, nstate); D = torch.zeros(dim); bias = torch.zeros(dim)
    B = cm(nstate, bf if bc_bf16 else torch.float32); C = cm(nstate, bf if bc_bf16 else torch.float32)
    fwd, bwd = _Capture(K._scan_fwd_kernel), _Capture(K._scan_bwd_kernel)
    seg, bseg = _Capture(K._scan_fwd_segment_kernel), _Capture(K._scan_bwd_segment_kernel)
    S._scan_fwd_kernel, S._scan_bwd_kernel, S._scan_fwd_segment_kernel = fwd, bwd, seg
    S._scan_bwd_segment_kernel = bseg
    cfg = S.scan_config(nstate, input_dtype=bf)
    if ckpt_dtype is not None:
        cfg["ckpt_dtype"] = ckpt_dtype
    cfg["bc_bf16"] = bc_bf16
    Bp, Cp = S.pack_bc(B, cfg), S.pack_bc(C, cfg)
    n_chunks = triton.cdiv(length, cfg["T"])
    ckpt = torch.zeros(batch, n_chunks, dim, nstate, dtype=cfg["ckpt_dtype"])
    named = {}  # label -> (kernel, captured launch)

    def forward(label, store_ckpt, c):
        """scan_fwd's launches as `label` (its main kernel, the last launch), `label`-pre (the
        pre-pass as the main kernel with PRE) and `label`-seg (the one-chunk pre-pass)."""
        n0, s0 = len(fwd.calls), len(seg.calls)
        S.scan_fwd(u, delta, A, Bp, Cp, D, z, bias, True, None, store_ckpt=store_ckpt, cfg=c)
        named[label] = (K._scan_fwd_kernel, fwd.calls[-1])
        if len(fwd.calls) - n0 > 1:
            named[label + "-pre"] = (K._scan_fwd_kernel, fwd.calls[n0])
        if len(seg.calls) > s0:
            named[label + "-seg"] = (K._scan_fwd_segment_kernel, seg.calls[s0])

    # the inference forward in 2 pieces, its pre-pass one chunk at a time
    forward("fwd-infer", False, dict(cfg, SEG=2, pre_split=1, pre_pairs=False))
    forward("fwd-pipelined", True, dict(cfg, pipeline_ckpt=True))   # the training forward's
    forward("fwd-one-chunk", True, dict(cfg, pipeline_ckpt=False))  # two loops
    capped = S.scan_config(nstate, backward=True)
    if capped.get("maxnreg"):  # the training forward with the backward's register cap, as
        # forward_config ran it for short batches until the thirteenth session
        forward("fwd-capped", True,
                dict(cfg, maxnreg=capped["maxnreg"], warps_per_sm=capped["warps_per_sm"]))
    if (cfg["NPT"], cfg["KN"]) == (8, 2):  # forward_config's NPT 4 tile (one-piece launches),
        # the training forward with its per-(step, channel) work one step a lane; inference;
        # training in quads, and in 2 pieces: its pre-pass in quads (PRE)
        forward("fwd-npt4", True, dict(cfg, NPT=4, KN=4, LD=8))
        forward("fwd-npt4-infer", False, dict(cfg, NPT=4, KN=4, LD=8))
        forward("fwd-npt4-quads", True, dict(cfg, NPT=4, KN=4, LD=8, quads_ckpt=True))
        forward("fwd-npt4-quads-pieces", True,
                dict(cfg, NPT=4, KN=4, LD=8, quads_ckpt=True, SEG=2, pre_split=1))
    bwd_over = bwd_over or {}
    # cfg None: scan_bwd picks backward_config (on CPU tensors, scan_config's cap)
    bwd_cfgs = [cfg_bwd if cfg_bwd is not None else (dict(capped, **bwd_over) if bwd_over else None)]
    if cfg_bwd is None and capped.get("maxnreg"):
        bwd_cfgs.append(dict(dict(capped, maxnreg=128, warps_per_sm=16, pairs=False, bc_bf16=True), **bwd_over))  # as backward_config (its uncapped case: --bwd maxnreg=0)
    # the backward's B and C as the library packs them from the mixer's bf16 rows: in the dtype
    # its config reads (backward_config's bc_bf16: fp32 at the 168 cap, bf16 at 128)
    B16, C16 = cm(nstate), cm(nstate)
    packed = lambda c: (S.pack_bc(B16, dict(c, T=cfg["T"])), S.pack_bc(C16, dict(c, T=cfg["T"])))  # noqa: E731
    for label, c in zip(("bwd", "bwd-cap128"), bwd_cfgs):
        c = c or S.backward_config(nstate, batch, dim, u.device)
        S.scan_bwd(u, delta, A, *packed(c), D, z, bias, True, ckpt, cfg["T"], dout, None, False, cfg=c)
        named[label] = (K._scan_bwd_kernel, bwd.calls[-1])
    # the backward's pre-pass (its segment kernel), as launched with scan_config's tile
    S.scan_bwd(u, delta, A, *packed(capped), D, z, bias, True, ckpt, cfg["T"], dout, None, False,
               cfg=dict(capped, SEG=2))
    named["bwd-seg"] = (K._scan_bwd_segment_kernel, bseg.calls[-1])
    S._scan_fwd_kernel, S._scan_bwd_kernel = K._scan_fwd_kernel, K._scan_bwd_kernel
    S._scan_fwd_segment_kernel = K._scan_fwd_segment_kernel
    S._scan_bwd_segment_kernel = K._scan_bwd_segment_kernel
    return named


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nstate", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dump", default=None)
    ap.add_argument("--fwd", action="store_true")
    ap.add_argument("--ckpt-dtype", choices=["fp32", "bf16"], help="default: scan_config's for bf16 inputs")
    ap.add_argument("--bc-bf16", action="store_true",
                    help="the forward's B and C packed in bf16 (the backward's: as its config reads them)")
    ap.add_argument("--bwd", nargs="*", default=[], metavar="KEY=INT",
                    help="backward config overrides, e.g. rs_rounds=1")
    args = ap.parse_args()
    ckpt_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.ckpt_dtype]
    S._INTERPRET = False
    asc = triton.__version__.startswith("3.6")  # 3.6 (the H200's) gives lanes in dim order
    S.tie_order_ascending = lambda: asc
    for nstate in args.nstate:
        over = {k: int(v) for k, v in (kv.split("=") for kv in args.bwd)}
        named = capture(nstate, ckpt_dtype=ckpt_dtype, bwd_over=over, bc_bf16=args.bc_bf16)
        order = ["bwd", "bwd-cap128"]
        if args.fwd:
            order += ["fwd-pipelined", "fwd-one-chunk", "fwd-infer", "fwd-infer-seg", "fwd-capped",
                      "fwd-npt4", "fwd-npt4-infer", "fwd-npt4-quads", "fwd-npt4-quads-pieces-pre",
                      "bwd-seg"]
        todo = [(name, *named[name]) for name in order if name in named]
        for name, fn, (grid, a, kw) in todo:
            kw = dict(kw); kw["FAST_LOG"] = True
            k = compile_captured(fn, a, kw)
            st, sass, ttgir = sass_stats(k)
            cfg = {x: kw[x] for x in ("T", "NPT", "KN", "LD", "WD")}
            # a thread's (channel, state, step) elements per loop iteration (one chunk)
            # (the pipelined forward and its segment pre-pass run two chunks per iteration)
            two = kw.get("PIPELINE") or fn is K._scan_fwd_segment_kernel
            elems = cfg["T"] * cfg["NPT"] * (2 if two else 1)
            extra = {x: kw[x] for x in ("RS", "RS_ROUNDS", "maxnreg", "PIPELINE") if x in kw}
            if "ckpt_ptr" in fn.arg_names:  # the segment pre-pass stores none
                extra["ckpt"] = str(a[list(fn.arg_names).index("ckpt_ptr")].dtype).removeprefix("torch.")
            print(f"triton {triton.__version__} N={nstate} {name} {cfg} {extra} grid={grid} "
                  + " ".join(f"{k_}={v}" for k_, v in st.items())
                  + f" instr/elem={st['loop'] / elems:.1f} shfl/elem={st['loop_shfl'] / elems:.2f}")
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                open(f"{args.dump}/{name}-N{nstate}.sass", "w").write(sass)
                open(f"{args.dump}/{name}-N{nstate}.ttgir", "w").write(ttgir)


if __name__ == "__main__":
    main()
