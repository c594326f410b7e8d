"""benchmarks/multi_gpu.sh in its CPU smoke mode (BYTELM_MULTI_GPU_SMOKE=1: 2 gloo processes, a
tiny model): every run finishes, the report has a row of finite numbers for each, and in fp32 the
2-rank runs and the resumed run follow the 1-process curve (the same windows in every step).
The timings are CPU numbers and are not checked."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "multi_gpu.sh"
RUNS = ("one", "one-accum", "ddp", "fsdp", "fsdp-resume")


def number(text: str) -> float:
    return float(text.strip().replace(",", "").rstrip("%"))


def test_multi_gpu_script_smoke_run_reports_every_run(tmp_path):
    env = {**os.environ, "BYTELM_MULTI_GPU_SMOKE": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "multi"), "6"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = proc.stdout
    assert (tmp_path / "multi" / "report.md").read_text() == report
    assert "Command: `BYTELM_MULTI_GPU_SMOKE=1 bash benchmarks/multi_gpu.sh" in report
    layouts = {"one": "4 x 1 x 1", "one-accum": "2 x 2 x 1", "ddp": "2 x 1 x 2",
               "fsdp": "2 x 1 x 2", "fsdp-resume": "4 x 1 x 1"}
    for run in RUNS:
        (row,) = [line for line in report.splitlines() if line.startswith(f"| {run} |")
                  and not line.endswith("% |")]  # not the scaling table's row
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == layouts[run]
        assert number(cells[3]) == 4 * 16  # 4 windows of 16 bytes every optimizer step
        assert int(cells[4]) == {"one-accum": 10, "fsdp-resume": 3}.get(run, 6)
        values = [number(c) for c in cells[5:10]]  # s/step, bytes/s, per GPU, loss, val bpb
        assert all(math.isfinite(v) and v > 0 for v in values), row
        per_gpu = values[2] * (2 if run in ("ddp", "fsdp") else 1)
        assert abs(values[1] - per_gpu) <= 1, row  # printed rounded to whole bytes/s
    for run in ("ddp", "fsdp"):
        (row,) = [line for line in report.splitlines() if line.startswith(f"| {run} | ") and
                  line.endswith("% |")]
        assert all(math.isfinite(number(c)) for c in row.strip("|").split("|")[1:])
    summaries = re.findall(r"(\d+) common steps: mean \|difference\| ([\d.]+), max ([\d.]+)", report)
    assert [int(n) for n, _, _ in summaries] == [6, 6, 3]  # ddp, fsdp, fsdp-resume against one
    assert all(float(largest) < 1e-3 for _, _, largest in summaries), summaries  # fp32: same data


def test_multi_gpu_script_needs_two_gpus(tmp_path):
    import torch

    if torch.cuda.device_count() >= 2:
        return
    env = {k: v for k, v in os.environ.items() if k != "BYTELM_MULTI_GPU_SMOKE"}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "multi")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: multi_gpu.sh needs 2 GPUs, found")
    assert len(proc.stderr.strip().splitlines()) == 1
