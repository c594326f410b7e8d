"""The markdown report of benchmarks/multi_gpu.sh, from the runs it left in OUT_DIR.

    python benchmarks/multi_gpu_report.py OUT_DIR --steps 200 --resume-step 100

Every number comes from the runs' own files: step times from the logged train/time column
(median over the intervals between logged steps, per optimizer step,
compare_curves.seconds_per_step), the batch from each
run's config.yaml (checked against the train/global_batch_bytes it logged), losses from
train/loss. A run missing, or a number that is not finite, is an error (exit 1), not a row.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_curves  # noqa: E402

# (run, what it is); its steps: fsdp-resume from the resume step on, the others from the start.
RUNS = [
    ("one", "1 GPU, the global batch in one micro-batch (same windows as ddp and fsdp)"),
    ("one-accum", "1 GPU, a DDP rank's micro-batch accumulated twice (throughput baseline)"),
    ("ddp", "2 GPUs, DDP"),
    ("fsdp", "2 GPUs, FSDP (checkpoint at the resume step)"),
    ("fsdp-resume", "fsdp's checkpoint resumed on 1 GPU"),
]


class ReportError(Exception):
    pass


def finite(value: float | None, what: str) -> float:
    if value is None or not math.isfinite(value):
        raise ReportError(f"{what}: {value} (missing or not finite)")
    return value


def layout(run: Path) -> dict:
    """Windows per micro-batch, accumulation, devices and bytes per optimizer step, as run."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    trainer = cfg.get("trainer", {})
    batch, seq_len = int(cfg["data"]["batch_size"]), int(cfg["data"]["seq_len"])
    accum = int(trainer.get("accumulate_grad_batches", 1))
    devices = int(trainer.get("devices", 1))
    step_bytes = batch * accum * devices * seq_len
    logged = compare_curves.read_column(run, "train/global_batch_bytes").get(0)
    if logged is not None and logged != step_bytes:
        raise ReportError(f"{run}: config gives {step_bytes} bytes a step, the run logged {logged}")
    return {"batch": batch, "accum": accum, "devices": devices, "seq_len": seq_len,
            "step_bytes": step_bytes}


def measure(out: Path, name: str, start: int) -> dict:
    run = out / name
    if not (run / "logs" / "metrics.csv").is_file():
        raise ReportError(f"{run}: no logs/metrics.csv (did the run start?)")
    row = layout(run)
    losses = {s: v for s, v in compare_curves.read_column(run, "train/loss").items() if s >= start}
    if not losses:
        raise ReportError(f"{run}: no train/loss from step {start} on")
    for step, loss in losses.items():  # so that every difference compare_curves prints is finite
        finite(loss, f"{name} train/loss at step {step}")
    row["steps"] = len(losses)
    row["s_per_step"] = finite(compare_curves.seconds_per_step(run, start), f"{name} s/step")
    row["bytes_per_s"] = row["step_bytes"] / row["s_per_step"]
    row["per_gpu"] = row["bytes_per_s"] / row["devices"]
    row["last_loss"] = finite(losses[max(losses)], f"{name} last train/loss")
    val = compare_curves.read_column(run, "val/bpb")
    row["val_bpb"] = finite(val[max(val)], f"{name} val/bpb") if val else None
    return row


def curves(a: Path, b: Path, every: int, *extra: str) -> str:
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            compare_curves.main([str(a), str(b), "--every", str(every), *extra])
    except SystemExit as e:
        raise ReportError(str(e)) from None
    return buffer.getvalue()


def environment() -> str:
    import lightning
    import torch

    parts = [f"torch {torch.__version__}", f"lightning {lightning.__version__}"]
    with contextlib.suppress(ImportError):
        import triton

        parts.append(f"triton {triton.__version__}")
    if torch.cuda.is_available():
        parts.insert(0, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    else:
        parts.insert(0, "CPU (smoke run: these numbers are not results)")
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        parts.append(f"code at {commit}{' (uncommitted changes)' if dirty else ''}")
    return "; ".join(parts)


def report(out: Path, steps: int, resume_step: int, command: str) -> str:
    rows = {name: measure(out, name, resume_step if name == "fsdp-resume" else 0)
            for name, _ in RUNS}
    lines = [f"# DDP and FSDP on 2 GPUs against 1 GPU: {out.name}", "",
             f"- {environment()}", f"- Command: `{command}`" if command else "",
             f"- {steps} optimizer steps; fsdp's step-{resume_step} checkpoint resumed on 1 GPU "
             f"for steps {resume_step + 1}-{steps}. Step time: median over the intervals between "
             f"logged steps of train/time, per optimizer step (rank 0, CUDA-synchronised at "
             f"logged steps).", "",
             "| run | what | windows x accumulated x devices | bytes/step | steps timed | "
             "s/step (median) | bytes/s | bytes/s per GPU | last train/loss | final val bpb |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, what in RUNS:
        r = rows[name]
        val = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "-"
        lines.append(f"| {name} | {what} | {r['batch']} x {r['accum']} x {r['devices']} | "
                     f"{r['step_bytes']:,} | {r['steps']} | {r['s_per_step']:.4f} | "
                     f"{r['bytes_per_s']:,.0f} | {r['per_gpu']:,.0f} | {r['last_loss']:.4f} | "
                     f"{val} |")
    lines += ["", "Scaling efficiency = (2-GPU bytes/s) / (2 x 1-GPU bytes/s):", "",
              "| 2-GPU run | against one-accum (same micro-batch a GPU) | "
              "against one (same global batch in one micro-batch) |", "| --- | --- | --- |"]
    for name in ("ddp", "fsdp"):
        vs = [rows[name]["bytes_per_s"] / (2 * rows[base]["bytes_per_s"])
              for base in ("one-accum", "one")]
        lines.append(f"| {name} | {vs[0]:.1%} | {vs[1]:.1%} |")
    every = max(1, steps // 10)
    lines += ["", "## Loss curves (train/loss, nats per byte; same windows in every step)", "",
              "### one vs ddp", "", curves(out / "one", out / "ddp", every),
              "### one vs fsdp", "", curves(out / "one", out / "fsdp", every),
              f"### one vs fsdp-resume, steps {resume_step + 1}-{steps} (after the resume)", "",
              curves(out / "one", out / "fsdp-resume", every, "--start", str(resume_step))]
    wall = out / "wall_seconds.txt"
    if wall.is_file():
        runs = [line.split() for line in wall.read_text().splitlines() if line.strip()]
        lines += ["Wall time of each run (start-up, steps, checkpoints, final validation): " +
                  ", ".join(f"{name} {sec} s" for name, sec in runs) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--resume-step", type=int, required=True)
    p.add_argument("--command", default="")
    args = p.parse_args(argv)
    try:
        print(report(args.out, args.steps, args.resume_step, args.command), end="")
    except (ReportError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
