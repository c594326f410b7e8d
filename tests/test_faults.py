"""Fault injection through train.py: SIGKILL and preemption signals at random steps, corrupt and
truncated checkpoints, a full disk, NaN/inf losses and gradients. After every fault the run must
resume to exactly (bitwise, on CPU) what an uninterrupted run produces: parameters, optimizer
state, data order and logged metrics."""

import csv
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from bytelm.training import checkpointing
from bytelm.training.checkpointing import verify_checkpoint
from bytelm.training.lm_module import LMTask
from word_corpus import write_word_corpus

REPO = Path(train.__file__).resolve().parent
# A resumed run equal bit for bit to an uninterrupted one: on the CPU. On a GPU the scan
# backward sums some gradients by atomics, in whatever order they land.
BITWISE = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="bitwise run comparisons are CPU-only (GPU atomics)")
STEPS = 24
# One thread here and in the subprocesses: a reduction split over threads can round differently.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_word_corpus(root / "corpus.txt")
    return root


def run_args(root: Path, name: str, steps: int = STEPS, *extra) -> list[str]:
    return ["--data", str(root / "corpus.txt"), "--name", name,
            "--train.out_dir", str(root / "runs"), "--data.prepared_dir", str(root / "prepared"),
            "--data.seq_len", "16", "--data.batch_size", "4", "--data.val_bytes", "256",
            "--model.d_model", "16", "--model.n_layer", "1", "--model.d_state", "4",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "2",
            "--train.eval_every", "4", "--train.ckpt_every", "4", "--train.sample_bytes", "0",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *extra]


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """The uninterrupted run every faulted run must reproduce."""
    assert train.main(run_args(root, "reference")) == 0
    return root / "runs" / "reference"


# ---- comparing runs -------------------------------------------------------------------------

# StepTimer's columns (ThroughputMonitor's in older runs) measure time, or count since the
# process started.
THROUGHPUT = re.compile(r"(^|/)(time|batches|samples|lengths|mfu|[a-z_]*per_sec)$|/device/")


def logged(run: Path) -> dict[str, list[tuple[int, str]]]:
    """metric -> [(step, value as written)], in file order."""
    series: dict[str, list[tuple[int, str]]] = {}
    with open(run / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("step", "epoch") and not THROUGHPUT.search(key):
                    series.setdefault(key, []).append((int(row["step"]), value))
    return series


def assert_equal_state(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(expected: Path, actual: Path):
    want = torch.load(expected / "checkpoints" / "last.ckpt", weights_only=False)
    got = torch.load(actual / "checkpoints" / "last.ckpt", weights_only=False)
    assert got["global_step"] == want["global_step"] == STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "callbacks"):
        assert_equal_state(want[key], got[key], key)
    want_logs, got_logs = logged(expected), logged(actual)
    assert got_logs.keys() == want_logs.keys()
    for key, series in got_logs.items():
        steps = [step for step, _ in series]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
        assert sorted(series) == sorted(want_logs[key]), key  # same steps, same values


# ---- subprocesses ---------------------------------------------------------------------------

def start(root: Path, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                                env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=err)


def wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, after_step: int, log: Path) -> int:
    """Block until a checkpoint newer than `after_step` is complete; returns its step."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        steps = [int(p.name[4:11]) for p in ckpt_dir.glob("step*.ckpt.json")]
        if steps and max(steps) > after_step:
            return max(steps)
        assert proc.poll() is None, f"train.py exited early:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint within 180 s")


@BITWISE
def test_sigkill_at_a_random_step_then_resume_is_exact(root, reference):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    run, log = root / "runs" / "killed", root / "killed.log"
    proc = start(root, run_args(root, "killed"), log)
    after = rng.choice(range(4, STEPS - 4, 4))  # a checkpoint, then a few steps: any moment
    wait_for_checkpoint(proc, run / "checkpoints", after - 1, log)
    time.sleep(rng.uniform(0, 0.1))
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill (seed {seed})"
    assert train.main(["--resume", str(run)]) == 0
    assert_same_run(reference, run)


@BITWISE
def test_preemption_signals_save_and_exit_then_resume_is_exact(root, reference):
    """SIGUSR1, resume, SIGTERM, resume: the second preemption also hits a resumed process."""
    run = root / "runs" / "preempted"
    args, saved = run_args(root, "preempted"), 0
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        log = root / f"preempted-{signum}.log"
        proc = start(root, args, log)
        wait_for_checkpoint(proc, run / "checkpoints", saved, log)
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum, log.read_text()[-3000:]
        message = log.read_text().strip().splitlines()[-1]
        found = re.fullmatch(rf"preempted by {signum.name} at step (\d+): saved (\S+); continue "
                             rf"with python train.py --resume {re.escape(str(run))}", message)
        assert found, message
        saved = int(found.group(1))
        assert Path(found.group(2)) == run / "checkpoints" / f"step{saved:07d}.ckpt"
        assert verify_checkpoint(Path(found.group(2)))["step"] == saved
        args = ["--resume", str(run)]
    assert train.main(args) == 0
    assert_same_run(reference, run)


def test_preemption_before_training_writes_nothing(root, monkeypatch, capsys):
    from bytelm.training.datamodule import ByteDataModule

    real_prepare = ByteDataModule.prepare_data

    def prepare_then_preempted(self):
        real_prepare(self)
        os.kill(os.getpid(), signal.SIGUSR1)  # remembered by train.py, not fatal

    monkeypatch.setattr(ByteDataModule, "prepare_data", prepare_then_preempted)
    assert train.main(run_args(root, "early")) == 128 + signal.SIGUSR1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "preempted by SIGUSR1 before training started; nothing was written")
    assert not (root / "runs" / "early").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


@BITWISE
def test_sigterm_before_our_handler_is_installed_still_checkpoints(root, reference, monkeypatch,
                                                                    capsys):
    """Lightning handles SIGTERM itself until training starts (it raises after the step)."""
    from bytelm.training.datamodule import ByteDataModule

    real_loader = ByteDataModule.train_dataloader

    def loader_then_sigterm(self):
        if self.trainer is not None:  # inside fit: Lightning's handler is the one installed
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loader(self)

    monkeypatch.setattr(ByteDataModule, "train_dataloader", loader_then_sigterm)
    run = root / "runs" / "early-term"
    assert train.main(run_args(root, "early-term")) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"preempted by SIGTERM at step 1: saved {run / 'checkpoints' / 'step0000001.ckpt'}; "
        f"continue with python train.py --resume {run}")
    monkeypatch.undo()
    assert train.main(["--resume", str(run)]) == 0
    assert_same_run(reference, run)


def crash_in_validation(monkeypatch, at_step: int):
    """Make the validation after optimizer step `at_step` raise; returns the real method."""
    real_validation_step = LMTask.validation_step

    def validation_step(self, batch, batch_idx):
        if self.trainer.global_step == at_step:
            raise RuntimeError("crash in validation")
        return real_validation_step(self, batch, batch_idx)

    monkeypatch.setattr(LMTask, "validation_step", validation_step)
    return real_validation_step


@BITWISE
def test_a_crash_during_a_checkpoint_steps_validation_resumes_from_the_one_before(
        root, reference, monkeypatch):
    """The step-8 checkpoint is only committed once step 8's validation is logged: after a crash
    in that validation the run resumes from step 4 and logs the validation it missed."""
    crash_in_validation(monkeypatch, at_step=8)
    with pytest.raises(RuntimeError, match="crash in validation"):
        train.main(run_args(root, "crashed"))
    run = root / "runs" / "crashed"
    assert verify_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 4
    monkeypatch.undo()
    assert train.main(["--resume", str(run)]) == 0
    assert_same_run(reference, run)


@BITWISE
def test_deferred_verdicts_resume_exactly(root, monkeypatch, capsys):
    """The fused optimizer's path reads each verdict a step late (or at a logging or checkpoint
    step's end): a run that crashes and resumes still logs, counts and trains exactly as an
    uninterrupted one, with faults before and after the checkpoint it resumes from."""
    extra = ("--optim.fused", "true", "--trainer.log_every_n_steps", "3")
    poison(monkeypatch, loss={3, 9}, grad={6})
    assert train.main(run_args(root, "deferred-ref", STEPS, *extra)) == 0
    real_validation_step = crash_in_validation(monkeypatch, at_step=8)
    with pytest.raises(RuntimeError, match="crash in validation"):
        train.main(run_args(root, "deferred-crashed", STEPS, *extra))
    monkeypatch.setattr(LMTask, "validation_step", real_validation_step)  # the faults stay
    run = root / "runs" / "deferred-crashed"
    assert train.main(["--resume", str(run)]) == 0
    assert_same_run(root / "runs" / "deferred-ref", run)
    counters = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    assert [v for k, v in counters.items() if "NumericalGuard" in k][0]["skipped"] == 3
    assert final_counters(run) == ("3.0", "0.0")


@BITWISE
def test_corrupt_and_truncated_checkpoints_fall_back_to_an_intact_one(root, reference, capsys):
    run = root / "runs" / "damaged"
    assert train.main(run_args(root, "damaged")) == 0
    ckpts = run / "checkpoints"
    newest, second = ckpts / f"step{STEPS:07d}.ckpt", ckpts / f"step{STEPS - 4:07d}.ckpt"
    with open(newest, "r+b") as f:  # flip bytes in the middle: the size stays right
        f.seek(newest.stat().st_size // 2)
        data = f.read(16)
        f.seek(-16, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))
    size = second.stat().st_size
    with open(second, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert train.main(["--resume", str(run)]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    fallback = f"resuming from step{STEPS - 8:07d}.ckpt instead"
    assert warnings == [
        f"warning: checkpoint {newest} does not match the sha256 in its manifest (the file is "
        f"corrupt); {fallback}",
        f"warning: checkpoint {second} has {size // 2} bytes but its manifest says {size} "
        f"(truncated or overwritten); {fallback}",
    ]
    assert_same_run(reference, run)  # the resumed run rewrote the damaged files
    assert verify_checkpoint(newest)["step"] == STEPS


def test_disk_full_on_save_is_one_line_and_keeps_the_previous_checkpoint(root, monkeypatch, capsys):
    real_write = checkpointing._HashingFile.write

    def write(self, data):
        if "step0000008" in self.file.name and self.bytes > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(checkpointing._HashingFile, "write", write)
    assert train.main(run_args(root, "full", 12)) == 2
    ckpts = root / "runs" / "full" / "checkpoints"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write checkpoint {ckpts / 'step0000008.ckpt'}: No space "
                      f"left on device (errno 28); the checkpoints before it are intact; free "
                      f"some space and resume"]
    assert sorted(p.name for p in ckpts.iterdir()) == [  # no temporary file left behind
        "last.ckpt", "last.ckpt.json", "step0000004.ckpt", "step0000004.ckpt.json"]
    assert verify_checkpoint(ckpts / "last.ckpt")["step"] == 4
    monkeypatch.undo()
    assert train.main(["--resume", str(ckpts.parent)]) == 0
    assert verify_checkpoint(ckpts / "last.ckpt")["step"] == 12


# ---- numerical faults -----------------------------------------------------------------------

def poison(monkeypatch, **steps_by_kind):
    """Make training steps misbehave: kind loss -> NaN loss, grad -> finite loss with NaN
    gradients, spike -> 20x loss; each maps to the global steps where it happens."""
    real_nll = LMTask.nll

    def nll(self, batch, *args, **kwargs):
        loss = real_nll(self, batch, *args, **kwargs)
        if not self.training:
            return loss
        step = self.trainer.global_step
        if step in steps_by_kind.get("loss", ()):
            return loss * float("nan")
        if step in steps_by_kind.get("grad", ()):
            w = next(self.parameters())
            return loss + (w.sum() - w.sum().detach()).abs().sqrt()  # 0, with a NaN gradient
        if step in steps_by_kind.get("spike", ()):
            return loss * 20
        return loss

    monkeypatch.setattr(LMTask, "nll", nll)


def adam_steps(ckpt: Path) -> set[int]:
    """Updates each parameter received (Adam counts them; a skipped step is not counted)."""
    state = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"]
    return {int(s["step"]) for s in state.values()}


def final_counters(run: Path) -> tuple[str, str]:
    series = logged(run)
    return series["train/skipped_steps"][-1][1], series["train/loss_spikes"][-1][1]


# fused: the default on the GPU, where the verdict reaches the optimizer as found_inf and the
# host reads it one step later (no host sync in the step); unfused: read at once
FUSED = pytest.mark.parametrize("fused", ["false", "true"], ids=["unfused", "fused_deferred"])


@FUSED
def test_skip_policy_drops_bad_updates_counts_them_and_warns_about_spikes(root, monkeypatch,
                                                                          capsys, fused):
    poison(monkeypatch, loss={3}, grad={5}, spike={12})
    assert train.main(run_args(root, f"skip-{fused}", 14, "--optim.fused", fused)) == 0
    run = root / "runs" / f"skip-{fused}"
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines[0] == ("warning: non-finite loss (nan) at step 3 (data batch 3): skipped its "
                        "update (1 skipped so far)")
    assert lines[1].startswith("warning: non-finite gradient (norm nan) at step 5 (data batch 5)")
    assert lines[2].startswith("warning: loss spike at step 12 (data batch 12): ")
    assert len(lines) == 3
    assert adam_steps(run / "checkpoints" / "last.ckpt") == {14 - 2}
    assert final_counters(run) == ("2.0", "1.0")
    model = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_stop_policy_checkpoints_names_the_step_and_resumes(root, monkeypatch, capsys):
    poison(monkeypatch, loss={3})
    assert train.main(run_args(root, "stop", 8, "--train.on_nonfinite", "stop")) == 1
    run = root / "runs" / "stop"
    ckpt = run / "checkpoints" / "step0000004.ckpt"  # the skipped step 3 counts as a step
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: non-finite loss (nan) at step 3 (data batch 3); stopped without "
                      f"applying it (train.on_nonfinite=stop); saved {ckpt} (continue with "
                      f"--resume {run})"]
    assert verify_checkpoint(ckpt)["step"] == 4 and adam_steps(ckpt) == {3}
    monkeypatch.undo()
    assert train.main(["--resume", str(run)]) == 0
    assert adam_steps(run / "checkpoints" / "last.ckpt") == {7}


@pytest.mark.parametrize("bad_steps, option, message", [
    ({2, 3, 4}, "--train.max_skips_in_row", "3 steps in a row had a non-finite loss or gradient"
                                            " (train.max_skips_in_row), the last a loss (nan) at"
                                            " step 4"),
    ({1, 3, 5}, "--train.max_skips", "3 steps had a non-finite loss or gradient (train.max_skips),"
                                     " the last a loss (nan) at step 5"),
])
@FUSED
def test_repeated_faults_stop_the_run(root, monkeypatch, capsys, bad_steps, option, message, fused):
    poison(monkeypatch, loss=bad_steps)
    name = option.rsplit(".", 1)[1] + f"-{fused}"
    # rarely logging: the deferred verdict is read at the next step, not at a logging step's end
    assert train.main(run_args(root, name, 10, option, "3", "--optim.fused", fused,
                               "--trainer.log_every_n_steps", "100")) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message} (data batch ")
    # read one step late on the deferred path: the step after the last bad one runs too
    last = max(bad_steps) + (2 if fused == "true" else 1)
    ckpt = root / "runs" / name / "checkpoints" / f"step{last:07d}.ckpt"
    assert verify_checkpoint(ckpt)
    assert adam_steps(ckpt) == {last - len(bad_steps)}  # every bad update dropped, no other
