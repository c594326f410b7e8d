"""What the kernel benchmark scripts share: timing, the card's copy bandwidth, the header, the
results file."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_shapes(text: str, shapes: list[tuple]) -> list[tuple]:
    """"all", or a comma list of indices into `shapes` and AxBxC shapes."""
    if text == "all":
        return shapes
    return [tuple(int(v) for v in part.split("x")) if "x" in part else shapes[int(part)]
            for part in text.split(",")]


def timer(device: str, reps: int, graph: bool = False):
    """fn -> median ms. CUDA: triton's do_bench (eager: Python and launches included), or with
    graph=True CUDA-graph replays (GPU time alone; NaN for a path that cannot be captured).
    CPU: wall time of `reps` calls after one warm-up."""
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        def bench(fn):
            if not graph:
                return do_bench(fn, warmup=25, rep=200, return_mode="median")
            try:
                return do_bench_cudagraph(fn, rep=100, return_mode="median")
            except Exception as e:  # a path that cannot be captured must not cost the run
                print(f"graph capture failed: {e!r}"[:300], flush=True)
                return float("nan")
        return bench

    def bench(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return bench


def copy_bandwidth(bench) -> float:
    """Bytes per second (read + write) of a 1 GiB device-to-device copy."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (bench(lambda: y.copy_(x)) * 1e-3)


def environment(device: str, bench) -> list[str]:
    """Markdown lines naming the machine and versions (and the measured copy bandwidth)."""
    if device != "cuda":
        return [f"- CPU ({os.cpu_count()} cores), Triton interpreter; torch {torch.__version__}"]
    import triton

    props = torch.cuda.get_device_properties(0)
    return [f"- GPU: {props.name} ({props.multi_processor_count} SMs); copy bandwidth "
            f"{copy_bandwidth(bench) / 1e9:.0f} GB/s (read + write)",
            f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"Python {platform.python_version()}"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def table_head(head: str) -> list[str]:
    """A markdown table's header line and the rule under it."""
    return [head, "|" + " --- |" * (head.count("|") - 1)]


def write_report(path, title: str, header: list[str], argv, notes: list[str], table: str,
                 tune_lines: list[str], tune_caption: str = "Tile variants of the raw kernels (same run):"):
    """A markdown results file at path: the title, the machine (header), the date, the command
    line (argv: the script's arguments, None for sys.argv's), notes, the table, and any tuning
    lines in a code block."""
    given = argv if argv is not None else sys.argv[1:]
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + list(given))
    parts = [f"# {title}", "", *header,
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `{cmd}`", *notes, "", table]
    if tune_lines:
        parts += ["", tune_caption, "", "```", *tune_lines, "```"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
