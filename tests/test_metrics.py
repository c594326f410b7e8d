"""What a run logs each step (bytelm/training/metrics.py): step time and throughput on logging
steps only, Python numbers written straight to the loggers, a progress bar that reads nothing
from the GPU; on a GPU, training steps with no host sync at all."""

import csv
import math
import warnings

import lightning as L
import pytest
import torch

import train
from bytelm.config import DataConfig, OptimConfig
from bytelm.models.lm import ModelConfig
from bytelm.training.datamodule import ByteDataModule
from bytelm.training.faults import NumericalGuard
from bytelm.training.lm_module import LMTask
from bytelm.training.metrics import ProgressBar, StepTimer
from word_corpus import write_word_corpus

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    write_word_corpus(root / "corpus.txt")
    return root


def rows(run):
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(run, key) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows(run) if r.get(key)}


def tiny_run_args(corpus, name, steps, every, *extra):
    return ["--data", str(corpus / "corpus.txt"), "--name", name, "--overwrite",
            "--train.out_dir", str(corpus / "runs"),
            "--data.prepared_dir", str(corpus / "prepared"),
            "--data.seq_len", "16", "--data.batch_size", "4",
            "--data.val_bytes", "256", "--model.d_model", "16", "--model.n_layer", "1",
            "--model.d_state", "4", "--train.eval_every", "4", "--train.ckpt_every", "100",
            "--train.sample_bytes", "0", "--trainer.max_steps", str(steps),
            "--trainer.log_every_n_steps", str(every), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def test_step_metrics_are_logged_on_logging_steps_only(corpus):
    """Every log_every_n_steps-th step and the last (10, not a multiple of 3 or of eval_every,
    where the run stops: Lightning writes that row too), one row a step."""
    steps, every, batch, seq_len = 10, 3, 4, 16
    assert train.main(tiny_run_args(corpus, "timer", steps, every)) == 0
    run = corpus / "runs" / "timer"
    logging_steps = {2, 5, 8, 9}
    for key in ("train/time", "train/tokens_per_sec", "train/bytes_per_sec", "train/flops_per_sec",
                "train/lr", "train/flops", "train/loss", "train/bpb", "train/grad_norm",
                "train/skipped_steps", "train/loss_spikes"):
        assert set(column(run, key)) == logging_steps, key
    timer_rows = [int(r["step"]) for r in rows(run) if r.get("train/time")]
    assert sorted(timer_rows) == sorted(logging_steps)  # StepTimer's row: once a step
    time = column(run, "train/time")
    assert all(time[a] < time[b] for a, b in zip(sorted(time), sorted(time)[1:]))
    tokens, n_bytes = column(run, "train/tokens_per_sec"), column(run, "train/bytes_per_sec")
    flops = column(run, "train/flops_per_sec")
    task = LMTask(ModelConfig(d_model=16, n_layer=1, d_state=4), OptimConfig(), seq_len)
    for step in logging_steps:
        assert tokens[step] > 0 and n_bytes[step] == pytest.approx(tokens[step])  # a byte model
        assert flops[step] == pytest.approx(3 * task.flops_per_token * tokens[step])
    assert not any("mfu" in key for key in rows(run)[0])  # no known peak on the CPU
    per_step = 3 * task.flops_per_token * seq_len * batch
    assert column(run, "train/flops") == {s: pytest.approx((s + 1) * per_step) for s in logging_steps}


def test_the_last_step_is_logged_also_when_it_validates(corpus):
    """max_steps a multiple of eval_every and not of log_every_n_steps: the last step still
    gets its row, with the loss and every number StepTimer writes, and validates once."""
    assert train.main(tiny_run_args(corpus, "last", 12, 5)) == 0
    run = corpus / "runs" / "last"
    for key in ("train/loss", "train/lr", "train/flops", "train/time", "train/skipped_steps"):
        assert set(column(run, key)) == {4, 9, 11}, key
    assert sorted(column(run, "val/bpb")) == [3, 7, 11]


def test_a_time_limited_run_logs_its_last_step(corpus):
    """trainer.max_time stops the run at whatever step: that step's row has the loss and the
    numbers StepTimer writes (Lightning's own Timer would come after StepTimer)."""
    assert train.main(tiny_run_args(corpus, "timed", 100000, 100000,
                                    "--trainer.max_time", "00:00:00:03")) == 0
    run = corpus / "runs" / "timed"
    last = max(column(run, "train/loss"))  # on a GPU the first step's compiles can take it all
    assert last < 100000 - 1
    for key in ("train/lr", "train/time", "train/skipped_steps"):
        assert max(column(run, key)) == last, key


def test_a_stop_at_a_step_between_logging_steps_logs_that_steps_values(corpus, monkeypatch):
    """Lightning writes a row where a run stops and keeps the last logged value of each
    metric: the loss is logged every step, so that row holds the stopping step's own (NaN)
    loss, not the one from the logging step before."""
    real_nll = LMTask.nll

    def nll(self, batch, *args, **kwargs):
        loss = real_nll(self, batch, *args, **kwargs)
        return loss * float("nan") if self.training and self.trainer.global_step == 4 else loss

    monkeypatch.setattr(LMTask, "nll", nll)
    assert train.main(tiny_run_args(corpus, "stopped", 10, 3, "--train.on_nonfinite", "stop")) == 1
    loss = column(corpus / "runs" / "stopped", "train/loss")
    assert sorted(loss) == [2, 4] and math.isnan(loss[4]) and not math.isnan(loss[2])


def test_accumulated_steps_log_each_value_once(corpus):
    """Two micro-batches a step, logging every step: each value once per optimizer step, the lr
    the one the step applied (warmup: step k applies (k + 1) / warmup of the peak)."""
    assert train.main(tiny_run_args(corpus, "accum", 4, 1, "--trainer.accumulate_grad_batches",
                                    "2", "--optim.lr", "1e-2", "--optim.warmup_steps", "10")) == 0
    run = corpus / "runs" / "accum"
    seen = {}
    for row in rows(run):
        for key, value in row.items():
            if value and key not in ("step", "epoch"):
                seen.setdefault(key, []).append(int(row["step"]))
    for key, steps in seen.items():
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
    assert column(run, "train/lr") == {s: pytest.approx(1e-2 * (s + 1) / 10) for s in range(4)}


def test_progress_bar_shows_the_guards_loss_and_the_lr(corpus):
    cfg = DataConfig(source=str(corpus / "corpus.txt"), prepared_dir=str(corpus / "prepared"),
                     seq_len=16, batch_size=4, val_bytes=256)
    dm = ByteDataModule(cfg, seed=0)
    task = LMTask(ModelConfig(d_model=16, n_layer=1, d_state=4), OptimConfig(lr=1e-3), 16)
    guard, bar = NumericalGuard(), ProgressBar()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=[guard, bar], enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    shown = bar.get_metrics(trainer, task)
    assert shown["train/loss"] == guard.last_loss and 0 < guard.last_loss < 10
    assert float(shown["train/lr"]) == pytest.approx(trainer.optimizers[0].param_groups[0]["lr"],
                                                     rel=1e-2)


class _SyncProbe(L.Callback):
    """Turns torch's sync debug mode on from the start of step 2 (after the first steps'
    compiles and caches) to the end of step 6, in a run that logs nowhere in between: every
    synchronising CUDA call there warns. control: read a value from the GPU in step 4 (the
    probe must catch it)."""

    def __init__(self, control: bool, guard: NumericalGuard):
        self.control, self.guard = control, guard
        self.unread_at_step_end = []  # was each step's verdict still unread at its end?

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        if batch_idx == 4 and self.control:
            batch.sum().item()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if 2 <= batch_idx <= 6:
            self.unread_at_step_end.append(self.guard._pending is not None)
        if batch_idx == 6:
            torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer, pl_module, exception):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not CUDA, reason="host syncs are a GPU matter")
@pytest.mark.parametrize("trainer_kw,control", [(dict(gradient_clip_val=1.0), False), ({}, False),
                                                ({}, True)], ids=["clip", "noclip", "control"])
def test_training_steps_do_not_wait_for_the_gpu(corpus, tmp_path, trainer_kw, control):
    """The default GPU loop (bf16-mixed, fused AdamW, the NumericalGuard, StepTimer, ProgressBar,
    the run's loggers) queues step after step without a host sync between logging steps.
    (Before: ~7 a step, 18.7 ms of a 125M step on the H200: benchmarks/results/train-loop-h200.md.)"""
    from bytelm.training.csv_log import ResumableCSVLogger

    cfg = DataConfig(source=str(corpus / "corpus.txt"), prepared_dir=str(corpus / "prepared"),
                     seq_len=64, batch_size=4, val_bytes=256)
    dm = ByteDataModule(cfg, seed=0)
    task = LMTask(ModelConfig(d_model=32, n_layer=2, d_state=16), OptimConfig(lr=1e-3), 64)
    guard = NumericalGuard()
    probe = _SyncProbe(control, guard)
    callbacks = [guard, ProgressBar(), StepTimer(), probe]
    trainer = L.Trainer(max_steps=8, accelerator="gpu", devices=1, precision="bf16-mixed",
                        logger=ResumableCSVLogger(tmp_path), log_every_n_steps=1000,
                        enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks,
                        enable_model_summary=False, **trainer_kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=dm)
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert bool(syncs) == control, syncs[:3]
    # the guard waits on its own event, which the debug mode does not see: the verdict must be
    # read a step later, not at the step's end
    assert probe.unread_at_step_end == [True] * 5
