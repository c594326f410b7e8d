"""What train.py's Lightning loop costs around the training step: seconds per optimizer step of
the same model, optimizer and data in a bare PyTorch loop and in train.py itself.

    python benchmarks/train_loop.py --config configs/mamba-125m.yaml --steps 60 [--warmup 10]
        [--data PATH] [--train-py PATH ...] [--out FILE]

Prints one markdown table (also written to --out), one row per variant:
- `bare`: the config's LMTask (its loss, LMTask.nll), AdamW over lm_module.param_groups (fused
  on CUDA unless optim.fused says otherwise) with the config's betas, eps, lr, weight decay and
  lm_module.lr_lambda schedule, clipping as trainer.gradient_clip_val says, bf16 autocast on
  CUDA (fp32 on the CPU), zero_grad(set_to_none=True); batches from the config's corpus through
  the datamodule, copied with non_blocking. No host sync inside the loop: wall clock over
  --steps steps after --warmup, synchronised only before the first and after the last. The
  floor: what the step costs with nothing around it.
- `bare+sync`: the same plus `loss.item()` after backward every step, one host sync a step with
  no other CPU work after it: what a sync costs by itself (the GPU idles while the CPU queues
  the rest of the step and the next one).
- `train.py` (one row per --train-py PATH, labelled as given; default this checkout's): that
  train.py in a subprocess, run from its own directory (so it imports its own bytelm), on the
  same config with the run directory and the prepared corpus in a temporary folder (deleted at
  the end), validation, checkpoints and samples pushed out of the timed steps, the default
  callbacks (NumericalGuard, the progress bar, StepTimer, ...) and logging cadence
  (log_every_n_steps 10). Its step time is the median of the logged train/time intervals
  between the logged steps that fall in the timed steps (compare_curves.seconds_per_step; the
  header names them), so --steps must cover at least two logged points after the warm-up. It
  runs one step more than warmup + steps: the final checkpoint is written inside the last
  step's callbacks and would land in the last timed interval.
  train.py against bare+sync: what the loop costs beyond one host sync a step.

One device, one micro-batch a step, train.py's default precision: a config that sets
trainer.accumulate_grad_batches, precision or more devices is refused. A missing config or
corpus is a one-line error (exit 2); a train.py that fails gets a row saying so, its
stderr's tail on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_curves  # noqa: E402
from common import table_head  # noqa: E402

BIG = 10**9  # eval_every / ckpt_every: never inside the run
LOG_EVERY = 10  # train.py's default log_every_n_steps


class RunFailed(Exception):
    """A train.py subprocess that exited non-zero or logged too few timing points."""


def load_config(config: str, data: str | None):
    """The resolved config (as train.py resolves it), with local corpus paths made absolute so a
    train.py run from another directory reads the same files."""
    from bytelm.config import ConfigError, build_config, load_yaml, parse_overrides
    from bytelm.data.sources import DOWNLOADS

    cfg = build_config(load_yaml(config), parse_overrides(["--data", data] if data else []))
    source = cfg.data.source
    if source != "stdlib" and source not in DOWNLOADS and not source.startswith("hf:"):
        cfg.data.source = os.path.abspath(source)
    if cfg.data.probe_words:
        cfg.data.probe_words = os.path.abspath(cfg.data.probe_words)
    trainer = cfg.trainer
    if trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError("trainer.accumulate_grad_batches: the bare loop takes one micro-batch a "
                          "step; benchmark without it")
    if "precision" in trainer:
        raise ConfigError("trainer.precision: the bare loop uses train.py's default (bf16 "
                          "autocast on CUDA, fp32 on the CPU); benchmark without it")
    if trainer.get("devices", "auto") not in ("auto", 1) or trainer.get("num_nodes", 1) != 1:
        raise ConfigError("trainer.devices / num_nodes: one device only")
    return cfg


def timed_points(warmup: int, steps: int, every: int) -> list[int]:
    """train.py's logged steps inside the timed steps: logged step s holds train/time at the end
    of optimizer step s + 1; the first one counted is the end of the warm-up."""
    return [s for s in range(max(0, warmup - 1), warmup + steps) if (s + 1) % every == 0]


def bare_loop(cfg, dm, device: torch.device, steps: int, warmup: int, total_steps: int,
              sync: bool) -> float:
    """Seconds per optimizer step of the plain loop (see the module docstring)."""
    from bytelm.training.lm_module import LMTask, lr_lambda, param_groups

    torch.manual_seed(cfg.seed)
    task = LMTask(cfg.model, cfg.optim, cfg.data.seq_len, compile=cfg.train.compile,
                  tokenizer=dm.tokenizer).to(device)
    task.configure_model()  # torch.compile when train.compile says so, as Lightning calls it
    task.train()
    o = cfg.optim
    fused = device.type == "cuda" if o.fused is None else o.fused
    opt = torch.optim.AdamW(param_groups(task.model, o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)
    total = o.decay_steps or total_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, o.warmup_steps, total, o.min_lr_ratio))
    params = [p for group in opt.param_groups for p in group["params"]]
    clip = cfg.trainer.get("gradient_clip_val") or 0.0
    by_value = cfg.trainer.get("gradient_clip_algorithm") == "value"
    batches = iter(dm.train_dataloader())

    def step():
        batch = next(batches).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = task.nll(batch)
        loss.backward()
        if sync:
            loss.item()
        if clip > 0:
            if by_value:
                torch.nn.utils.clip_grad_value_(params, clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    del task, opt, sched, params, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def train_py_loop(script: Path, config: str, cfg, tmp: Path, steps: int, warmup: int) -> float:
    """Seconds per optimizer step of `script` (a train.py) run in a subprocess."""
    name = f"train-loop-{uuid.uuid4().hex[:8]}"
    runs = tmp / "runs"
    cmd = [sys.executable, str(script), "--config", os.path.abspath(config), "--name", name,
           "--data", cfg.data.source, "--data.prepared_dir", cfg.data.prepared_dir,
           "--train.out_dir", str(runs), "--trainer.max_steps", str(warmup + steps + 1),
           "--train.eval_every", str(BIG), "--train.ckpt_every", str(BIG),
           "--train.sample_bytes", "0", "--data.val_bytes", str(cfg.data.seq_len + 1)]
    if cfg.data.probe_words:
        cmd += ["--data.probe_words", cfg.data.probe_words]
    try:
        proc = subprocess.run(cmd, cwd=script.parent, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RunFailed(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{tail}")
        seconds = compare_curves.seconds_per_step(runs / name, max(0, warmup - 1), warmup + steps)
        if seconds is None:
            raise RunFailed(f"{script}: fewer than two train/time points in the timed steps of "
                            f"{runs / name / 'logs' / 'metrics.csv'}")
        return seconds
    finally:
        shutil.rmtree(runs / name, ignore_errors=True)  # a 125M run leaves a ~1.5 GB checkpoint


def versions() -> str:
    import lightning

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return (f"torch {torch.__version__}, triton {triton_version}, lightning "
            f"{lightning.__version__}, Python {platform.python_version()}")


def row(label: str, seconds: float | None, step_bytes: int, bare: float) -> str:
    if seconds is None:
        return f"| {label} | failed | | |"
    return (f"| {label} | {seconds:.4f} | {step_bytes / seconds:,.0f} | {seconds / bare:.2f}x "
            f"({(seconds - bare) * 1e3:+.1f} ms) |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a train.py YAML config")
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps first")
    p.add_argument("--data", help="corpus (data.source), as train.py's --data")
    p.add_argument("--train-py", action="append", dest="train_py", metavar="PATH",
                   help="a train.py to time (repeatable; default: this checkout's)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    command = shlex.join(["python", sys.argv[0] if argv is None else "benchmarks/train_loop.py",
                          *(sys.argv[1:] if argv is None else argv)])

    from bytelm.config import ConfigError
    from bytelm.data.sources import DataError
    from bytelm.training.datamodule import ByteDataModule

    scripts = [(label, Path(label).resolve()) for label in args.train_py or []]
    scripts = scripts or [("train.py", ROOT / "train.py")]
    tmp = Path(tempfile.mkdtemp(prefix="train-loop-"))
    try:
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps must be positive and --warmup not negative")
        for label, script in scripts:
            if not script.is_file():
                raise ConfigError(f"--train-py {label}: no such file")
        cfg = load_config(args.config, args.data)
        every = cfg.trainer.get("log_every_n_steps", LOG_EVERY)
        points = timed_points(args.warmup, args.steps, every)
        if len(points) < 2:
            raise ConfigError(f"--steps {args.steps} after --warmup {args.warmup}: train.py logs "
                              f"train/time every {every} steps, so fewer than two logged points "
                              f"fall in the timed steps; use more --steps")
        cfg.data.prepared_dir = str(tmp / "prepared")  # prepared once, read by every variant
        dm = ByteDataModule(cfg.data, cfg.seed)
        dm.prepare_data()
        dm.setup()
    except (ConfigError, DataError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        batch, seq_len = cfg.data.batch_size, cfg.data.seq_len
        step_bytes = batch * seq_len
        intervals = len(points) - 1
        lines = [
            f"- device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
            f"{versions()}",
            f"- config: {args.config} (data {cfg.data.source}); batch x seq_len: {batch} x "
            f"{seq_len}; {args.steps} timed steps after {args.warmup} warm-up",
            f"- bare rows: wall clock over the timed steps, synchronised before and after; "
            f"train.py rows: median of the logged train/time over {intervals} interval"
            f"{'s' if intervals != 1 else ''} of {every} steps (from the end of step {points[0] + 1} "
            f"to the end of step {points[-1] + 1})",
            f"- command: `{command}`",
            "",
            *table_head("| variant | s/step | bytes/s | vs bare |"),
        ]
        print("\n".join(lines), flush=True)
        failed = False
        total_steps = args.warmup + args.steps + 1  # train.py's max_steps: the same schedule

        def add(label, seconds):
            lines.append(row(label, seconds, step_bytes, bare))
            print(lines[-1], flush=True)

        bare = bare_loop(cfg, dm, device, args.steps, args.warmup, total_steps, sync=False)
        add("bare", bare)
        add("bare+sync",
            bare_loop(cfg, dm, device, args.steps, args.warmup, total_steps, sync=True))
        for label, script in scripts:
            try:
                seconds = train_py_loop(script, args.config, cfg, tmp, args.steps, args.warmup)
            except RunFailed as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                seconds, failed = None, True
            add(label, seconds)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return 1 if failed else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
