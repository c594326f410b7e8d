"""Copies of the scan kernels with one part of the backward taken out, to time what that part
costs (timing only: their gradients are wrong on purpose). Writes DEST/<variant>/{bytelm,
benchmarks}; time a variant with its own copy of scan_configs.py:

    python benchmarks/scan_ablate.py /tmp/abl
    python /tmp/abl/nors/benchmarks/scan_configs.py --label nors --shapes 0,1,4

noatom: dB, dC's atomics replaced by stores that never fire (the reduce-scatter kept);
nors: dB, dC summed in-thread to the reduce-scatter's shape, no shuffles, no atomics;
nostore: du, ddelta, dz computed but never stored.
"""
import shutil, sys
from pathlib import Path

KERNELS = "bytelm/ops/triton/selective_scan_kernels.py"
ATOM_B = 'tl.atomic_add(dB_ptr + red_base + red_tile, Q, sem="relaxed")'
ATOM_C = 'tl.atomic_add(dC_ptr + red_base + red_tile, Q, sem="relaxed")'
NEVER = "(red_base + red_tile < 0)"   # never true; the compiler cannot know it
NO_ATOMICS = [(ATOM_B, f"tl.store(dB_ptr + red_base + red_tile, Q, mask={NEVER})"),
              (ATOM_C, f"tl.store(dC_ptr + red_base + red_tile, Q, mask={NEVER})")]
VARIANTS = {
    "noatom": NO_ATOMICS,
    "nors": [("Q = tl.reshape(tl.permute(P, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), (KN, LD, V))",
              "Q = tl.sum(tl.reshape(tl.reshape(tl.permute(P, (AX_WD, AX_KN, AX_LD, AX_NPT, 0)), "
              "(KN, LD, V)), (KN, LD, LD, V // LD)), 2)"),
             ("for lvl in tl.static_range(RS_ROUNDS):", "for lvl in tl.static_range(0):")] + NO_ATOMICS,
    "nostore": [(f"tl.store({p}_ptr + off, {v}.to({p}_ptr.dtype.element_ty), mask=m)",
                 f"tl.store({p}_ptr + off, {v}.to({p}_ptr.dtype.element_ty), mask=m & (off < 0))")
                for p, v in (("dz", "dz"), ("du", "du"), ("ddelta", "ddt"))],
}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    src, dest = Path(__file__).resolve().parents[1], Path(sys.argv[1])
    for name, subs in VARIANTS.items():
        out = dest / name
        shutil.rmtree(out, ignore_errors=True)
        for d in ("bytelm", "benchmarks"):
            shutil.copytree(src / d, out / d, ignore=shutil.ignore_patterns("__pycache__", "results"))
        text = (out / KERNELS).read_text()
        for a, b in subs:
            if a not in text:
                sys.exit(f"{name}: the kernels no longer contain {a!r}; update scan_ablate.py")
            text = text.replace(a, b)
        (out / KERNELS).write_text(text)
        print(f"{name}: {out}")


if __name__ == "__main__":
    main()
