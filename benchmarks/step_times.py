"""Per-step times of throughput.py's training step for one model, by CUDA events, and the GPU's
SM clock, power draw and temperature sampled by nvidia-smi (throughput.GpuTelemetry) every 0.2 s
while it runs: whether a step's time moves with the clock (a power-limited step does). CUDA only.

    python benchmarks/step_times.py [STEPS [CONTEXT [Mamba|Transformer]]]   # 30 8192 Mamba

The 90M shapes of throughput.py, 65,536 bytes a step, 3 warm-up steps. Prints the wall time a
step, every step's event time, and the first and last three samples (MHz, W, C).
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import SIZES, GpuTelemetry, gpu_id, train_step  # noqa: E402


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    kind = sys.argv[3] if len(sys.argv) > 3 else "Mamba"
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/step_times.py needs a CUDA GPU")
    batch = 65536 // ctx
    _, _, step = train_step(SIZES["90m"][0 if kind == "Mamba" else 1], "triton")
    data = torch.randint(0, 256, (steps + 3, batch, ctx + 1), device="cuda")
    for i in range(3):
        step(data[i])
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    with GpuTelemetry(gpu_id(), 200, "clocks.sm,power.draw,temperature.gpu") as telemetry:
        ev[0].record()
        t0 = time.perf_counter()
        for i in range(steps):
            step(data[3 + i])
            ev[i + 1].record()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    ms = [ev[i].elapsed_time(ev[i + 1]) for i in range(steps)]
    clocks = telemetry.samples
    print(kind, ctx, "wall ms/step %.1f" % wall, "event ms/step:", " ".join("%.1f" % m for m in ms))
    print("clock MHz, W, C:", clocks[:3], "...", clocks[-3:], "n", len(clocks))


if __name__ == "__main__":
    main()
