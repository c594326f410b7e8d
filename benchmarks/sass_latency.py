"""Rough one-warp latency of the scan kernels' SASS main loop (offline): each instruction issues
in order one cycle after the previous one or when its source registers are ready, with fixed
latencies (MUFU 20, SHFL 24, LDG 450, LDL 30, others 5 cycles). Loop-carried values come from the
previous iteration (three iterations simulated, the last timed; the pipelined loops run two
chunks an iteration). A crude model: no pipe
contention, no other warps; it compares schedules, it does not predict times.

    python benchmarks/sass_bwd.py --dump DIR && python benchmarks/sass_latency.py DIR/bwd-N16.sass
"""
import re, sys
LAT = dict(MUFU=20, SHFL=24, LDG=450, LDL=30, LDS=30, DEFAULT=5, S2R=20)
NOWRITE = ("STG", "STL", "STS", "RED", "BRA", "BAR", "EXIT", "ISETP", "FSETP", "NOP")
def parse(path):
    s = open(path).read().splitlines()
    ins = [l for l in s if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", l).group(1), 16) for l in ins]
    best = (0, 0)
    for i, l in enumerate(ins):
        b = re.search(r"BRA\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)", l)
        if b:
            t = int(b.group(1), 16)
            if t < addr[i] and addr[i] - t > best[1] - best[0]:
                best = (t, addr[i])
    out = []
    for a, l in zip(addr, ins):
        if not best[0] <= a <= best[1]:
            continue
        txt = re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+", "", l).split(";")[0]
        pred = re.match(r"@!?(U?P\w+)\s+", txt)
        preds = [pred.group(1)] if pred else []
        txt = txt[pred.end():] if pred else txt
        op, _, rest = txt.partition(" ")
        operands = [o.strip() for o in rest.split(",")]
        regs = lambda o: re.findall(r"\b(U?R\d+|U?P\d)\b", o)
        width = 4 if ".128" in op else 2 if (".64" in op or "WIDE" in op) else 1
        dst, src = [], preds[:]
        writes = not op.startswith(NOWRITE) and operands and operands[0]
        for j, o in enumerate(operands):
            r = regs(o)
            if j == 0 and writes and not o.startswith("["):
                for x in r:
                    if x[0] in "RU" and x.lstrip("U")[0] == "R":
                        base = int(re.sub(r"\D", "", x))
                        pre = "UR" if x.startswith("U") else "R"
                        dst += [f"{pre}{base + k}" for k in range(width)]
                    else:
                        dst.append(x)
            else:
                src += r
        if op.startswith(("ISETP", "FSETP")):  # write predicates
            dst = [x for x in regs(operands[0]) + regs(operands[1])  if "P" in x]
            src = [x for o in operands[2:] for x in regs(o)] + preds
        lat = next((v for k, v in LAT.items() if op.startswith(k)), LAT["DEFAULT"])
        out.append((op, dst, src, lat))
    return out

def simulate(loop, iters=3):
    ready, cyc, starts = {}, 0, []
    for it in range(iters):
        starts.append(cyc)
        for op, dst, src, lat in loop:
            cyc = max([cyc + 1] + [ready.get(r, 0) for r in src if r not in ("RZ", "PT")])
            for r in dst:
                ready[r] = cyc + lat
    starts.append(cyc)
    return starts[-1] - starts[-2]

for p in sys.argv[1:]:
    loop = parse(p)
    print(f"{p}: {len(loop)} instr, {simulate(loop)} cycles/iteration alone")
