"""What a run logs every step, without making the host wait for the GPU.

A host sync inside the training step (reading a tensor's value, or making a CUDA tensor from a
Python number, which LightningModule.log does with every float) leaves the GPU idle while the
CPU catches up with launching the next kernels. So here: Python numbers go straight to the
loggers, on logging steps only; step time and throughput are measured between logging steps
(one sync each); the progress bar shows numbers the host already holds.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import RichProgressBar

PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def log_on_logging_steps(trainer, metrics: dict[str, float]) -> None:
    """Write Python numbers straight to the loggers, on the trainer's logging steps only
    (every trainer.log_every_n_steps optimizer steps, as Lightning logs self.log values)."""
    if trainer.is_global_zero and trainer._logger_connector.should_update_logs:
        trainer._logger_connector.log_metrics(metrics)


def _windows(batch) -> torch.Tensor:
    """The (batch, length) ids of a training batch or of a validation (windows, targets) pair."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class StepTimer(L.Callback):
    """Step time and throughput, with one host sync per logging step (Lightning's
    ThroughputMonitor synchronises after every batch). Logged on logging steps, rank 0:

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
        if not (trainer.is_global_zero and trainer._logger_connector.should_update_logs):
            return
        now = self._now(trainer)
        seconds = (now - self._last) - (self._paused - self._paused_at_last)
        tokens = (self._tokens - self._tokens_at_last) * trainer.world_size
        self._last, self._paused_at_last, self._tokens_at_last = now, self._paused, self._tokens
        metrics = {"train/time": now - self._start - self._paused}
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
        if trainer.optimizers:
            items["train/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        return items
