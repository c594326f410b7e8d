"""What a run logs every step, without making the host wait for the GPU.

A host sync inside the training step (reading a tensor's value, or making a CUDA tensor from a
Python number, which LightningModule.log does with every float) leaves the GPU idle while the
CPU catches up with launching the next kernels. So here: Python numbers go straight to the
loggers, on logging steps only; step time and throughput are measured between logging steps
(one sync each); the progress bar shows numbers the host already holds. A step between
logging steps then never waits (tests/test_metrics.py checks it on one GPU); over several,
ranks average by queued all_reduces and agree on preemption a step late
(bytelm/training/checkpointing.py).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import RichProgressBar

PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def may_log_this_step(trainer) -> bool:
    """Whether this optimizer step's row may reach the loggers: Lightning writes one on every
    log_every_n_steps-th step and on the step a run stops at (should_stop), which for the last
    step (max_steps) train.py's ValidateLastStep decides only at the step's end. Asked before
    that, this answers for the whole step (a stop the guard itself decides aside)."""
    step = trainer.fit_loop.epoch_loop._batches_that_stepped  # this step's index, all step long
    return trainer._logger_connector.should_update_logs or 0 < trainer.max_steps <= step + 1


def log_on_logging_steps(trainer, metrics: dict[str, float]) -> None:
    """Python numbers for this optimizer step's row. With a StepTimer (train.py) they join its
    one row per logging step; without one they go to the loggers at once on logging steps."""
    timer = next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)
    if timer is not None:
        timer.pending.update(metrics)
    elif trainer.is_global_zero and trainer._logger_connector.should_update_logs:
        trainer._logger_connector.log_metrics(metrics)


class HostCopy:
    """A tensor's value on its way to the host without waiting for it: a non-blocking copy into
    pinned memory and an event behind it on the stream; `tolist` waits for that event only,
    long passed when read a step later. On the CPU, a plain copy."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensor.detach().clone()

    def tolist(self):
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


def _windows(batch) -> torch.Tensor:
    """The (batch, length) ids of a training batch or of a validation (windows, targets) pair."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class StepTimer(L.Callback):
    """Step time and throughput, with one host sync per logging step (Lightning's
    ThroughputMonitor synchronises after every batch), written with the step's other Python
    numbers (log_on_logging_steps) as one row, on the steps Lightning writes its own. Put it
    last among the callbacks: then the others have decided whether the run stops at this step
    (Lightning's own row for the step depends on that). Logged on those steps, rank 0:

        train/time             seconds of training since this process started it (validation
                               and sampling left out; it starts at 0 again on a resume)
        train/tokens_per_sec   ids trained on per second since the previous logging step, all
                               ranks (bytes, for a byte model)
        train/bytes_per_sec    the UTF-8 bytes of text they stand for
        train/flops_per_sec    training FLOPs by the model's formula (3 x forward), all ranks
        train/mfu              flops_per_sec / the GPUs' datasheet peak in the run's precision,
                               where Lightning knows the GPU
    """

    def __init__(self, bytes_per_token: float = 1.0):
        self.bytes_per_token = bytes_per_token
        self._start: float | None = None
        self.pending: dict[str, float] = {}  # this step's numbers from log_on_logging_steps

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._start = self._last = self._now(trainer)
        self._paused = self._paused_at_last = 0.0  # seconds spent outside training
        self._pause_start: float | None = None
        self._tokens = self._tokens_at_last = 0  # this rank's, since on_train_start
        dtype = PRECISION_DTYPES.get(str(trainer.precision).split("-")[0], torch.float32)
        self._peak = get_available_flops(trainer.strategy.root_device, dtype)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._pause_start is not None:  # back from validation (which ends with a sync)
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._start is not None:
            self._pause_start = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        windows = _windows(batch)
        self._tokens += windows.shape[0] * (windows.shape[1] - 1)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not the end of an optimizer step
        metrics, self.pending = self.pending, {}
        if not (trainer.is_global_zero and trainer._logger_connector.should_update_logs):
            return
        now = self._now(trainer)
        seconds = (now - self._last) - (self._paused - self._paused_at_last)
        tokens = (self._tokens - self._tokens_at_last) * trainer.world_size
        self._last, self._paused_at_last, self._tokens_at_last = now, self._paused, self._tokens
        metrics["train/time"] = now - self._start - self._paused
        if seconds > 0 and tokens:
            metrics["train/tokens_per_sec"] = tokens / seconds
            metrics["train/bytes_per_sec"] = tokens * self.bytes_per_token / seconds
            flops_per_token = getattr(pl_module, "flops_per_token", None)
            if flops_per_token:
                flops = 3 * flops_per_token * tokens / seconds
                metrics["train/flops_per_sec"] = flops
                if self._peak:
                    metrics["train/mfu"] = flops / (self._peak * trainer.world_size)
        trainer._logger_connector.log_metrics(metrics)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing numbers the host holds already: the newest loss
    the NumericalGuard read (on the GPU, the previous step's), the learning rate and the
    validation results. A metric logged with prog_bar=True would instead be read from the GPU
    after every batch (Lightning's logger connector turns them into floats there)."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        loss = next((c.last_loss for c in trainer.callbacks if hasattr(c, "last_loss")), None)
        if loss is not None:
            items["train/loss"] = loss
        if trainer.optimizers:  # 3e-4 in three significant digits, not the bar's "0.000"
            items["train/lr"] = f"{trainer.optimizers[0].param_groups[0]['lr']:.2e}"
        return items
