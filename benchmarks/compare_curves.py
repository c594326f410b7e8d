"""Compare the training-loss curves of two runs step by step (e.g. two scan backends).

    python benchmarks/compare_curves.py runs/parity-triton runs/parity-ref [--every 20]

Prints a markdown table of train/loss at every `--every` steps for both runs and their
difference, then the mean and max absolute difference over all common steps and over the last
quarter, and each run's median seconds per step (from Lightning's throughput columns).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def read_column(run: Path, key: str) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def seconds_per_step(run: Path) -> float | None:
    """Median time between consecutive logged train/time points, per optimizer step."""
    times = read_column(run, "train/time")
    steps = sorted(times)
    rates = [(times[b] - times[a]) / (b - a) for a, b in zip(steps, steps[1:]) if b > a]
    return statistics.median(rates) if rates else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--key", default="train/loss")
    args = p.parse_args(argv)
    a, b = read_column(args.run_a, args.key), read_column(args.run_b, args.key)
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit(f"error: no common steps with {args.key} in {args.run_a} and {args.run_b}")
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
        sps = seconds_per_step(run)
        if sps:
            print(f"{run.name}: {sps:.3f} s per optimizer step (median)")


if __name__ == "__main__":
    main()
