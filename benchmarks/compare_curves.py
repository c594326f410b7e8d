"""Compare the training-loss curves of two runs step by step (e.g. two scan backends).

    python benchmarks/compare_curves.py runs/parity-triton runs/parity-ref [--every 20]
        [--start N] [--stop M]

Prints a markdown table of train/loss at every `--every` steps for both runs and their
difference, then the mean and max absolute difference over all common steps and over the last
quarter, and each run's median seconds per step (from Lightning's throughput columns).
`--start N --stop M` keep optimizer steps N+1 .. M only (logged steps N .. M-1): e.g. the part of
a run after it was resumed from step N.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def read_column(run: Path, key: str) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def seconds_per_step(run: Path, start: int = 0, stop: float = float("inf")) -> float | None:
    """Median time between consecutive logged train/time points, per optimizer step, over logged
    steps start .. stop-1. train/time restarts at 0 when a run is resumed: an interval that goes
    backwards spans the restart and is left out."""
    times = read_column(run, "train/time")
    steps = sorted(s for s in times if start <= s < stop)
    rates = [(times[b] - times[a]) / (b - a) for a, b in zip(steps, steps[1:])
             if b > a and times[b] > times[a]]
    return statistics.median(rates) if rates else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--key", default="train/loss")
    p.add_argument("--start", type=int, default=0, help="leave out logged steps before this one")
    p.add_argument("--stop", type=int, default=None, help="leave out logged steps from this one on")
    args = p.parse_args(argv)
    stop = float("inf") if args.stop is None else args.stop
    a, b = read_column(args.run_a, args.key), read_column(args.run_b, args.key)
    common = sorted(s for s in set(a) & set(b) if args.start <= s < stop)
    if not common:
        raise SystemExit(f"error: no common steps with {args.key} in {args.run_a} and {args.run_b}"
                         f" in the range asked for")
    print(f"| step | {args.run_a.name} | {args.run_b.name} | difference |\n| --- | --- | --- | --- |")
    for step in common:
        if step % args.every == args.every - 1 or step == common[-1]:
            print(f"| {step + 1} | {a[step]:.4f} | {b[step]:.4f} | {a[step] - b[step]:+.4f} |")
    diffs = [abs(a[s] - b[s]) for s in common]
    tail = diffs[-max(1, len(diffs) // 4):]
    print(f"\n{len(common)} common steps: mean |difference| {statistics.mean(diffs):.4f}, "
          f"max {max(diffs):.4f}; last quarter mean {statistics.mean(tail):.4f}, "
          f"max {max(tail):.4f}")
    for run in (args.run_a, args.run_b):
        sps = seconds_per_step(run, args.start, stop)
        if sps:
            print(f"{run.name}: {sps:.3f} s per optimizer step (median)")


if __name__ == "__main__":
    main()
