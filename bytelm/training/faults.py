"""Numerical faults, caught at the step they happen.

A NaN/inf loss or gradient is handled by `train.on_nonfinite`:
    skip  the step's update is dropped (the step still counts, so the next step reads the next
          batch and the schedule moves on) and counted in train/skipped_steps;
    stop  the update is dropped and the run stops with a checkpoint and a message naming the
          step and the data batch.
Too many skipped steps, in a row (`train.max_skips_in_row`) or in all (`train.max_skips`), stop
the run too. A loss above `train.spike_factor` x its running mean is counted in
train/loss_spikes, with a warning line. The counters and the running mean are checkpointed, so
a resumed run logs exactly what an uninterrupted one would.

No host sync on the default GPU path (policy skip, a fused optimizer, no fp16 grad scaler):
reading the verdict on the host would leave the GPU idle while the CPU catches up, every
step. There the verdict goes to the optimizer as a tensor (`found_inf`, as a GradScaler hands
it over: the fused AdamW then leaves parameters and moments untouched), and the host reads it
at the next step, when it is long computed, or at the end of a step whose row is logged or
checkpointed (a short wait, there only): the warnings, the counters and a stop for too many
skips may come one step late (naming the right step). The stop policy, and other optimizers,
read it at once.
"""

from __future__ import annotations

import math
import sys

import lightning as L
import torch

from bytelm.training.distributed import all_reduce_mean, has_grad_scaler
from bytelm.training.metrics import HostCopy, log_on_logging_steps, may_log_this_step

SPIKE_WARMUP = 10  # steps of loss history before spikes are judged
SPIKE_DECAY = 0.98  # the running mean follows roughly the last 50 steps


def _skips_on_found_inf(optimizer) -> bool:
    """Does optimizer.step() honour a `found_inf` tensor, skipping the whole update when it is
    1 (torch's fused Adam/AdamW: parameters, moments and step count stay as they were)?"""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)
                and optimizer.defaults.get("fused"))


def _warn(trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(message, file=sys.stderr, flush=True)


class NumericalGuard(L.Callback):
    def __init__(self, policy: str = "skip", max_skips_in_row: int = 5, max_skips: int = 100,
                 spike_factor: float = 3.0):
        if policy not in ("skip", "stop"):
            raise ValueError(f"unknown non-finite policy {policy!r} (skip, stop)")
        self.policy, self.max_skips_in_row, self.max_skips = policy, max_skips_in_row, max_skips
        self.spike_factor = spike_factor
        self.skipped = self.skipped_in_row = self.spikes = self.loss_steps = 0
        self.loss_mean = 0.0
        self.stop_reason: str | None = None
        self.last_loss: float | None = None  # the newest loss read on the host
        self._loss_sum: torch.Tensor | None = None  # this step's micro-batch losses, summed
        self._pending = None  # a deferred verdict: (HostCopy of the stats, trainer, where)
        self._flagged = None  # the optimizer holding this step's found_inf

    def state_dict(self) -> dict:
        self._read_pending()  # the checkpoint holds every finished step's verdict
        return {"skipped": self.skipped, "skipped_in_row": self.skipped_in_row,
                "spikes": self.spikes, "loss_steps": self.loss_steps, "loss_mean": self.loss_mean}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def on_before_backward(self, trainer, pl_module, loss):
        # Lightning divides the loss by the accumulation count (and a GradScaler multiplies it):
        # the sum over the step's micro-batches is then their mean loss.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss = loss.detach().float() / (scaler.get_scale() if scaler is not None else 1.0)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        scaled = has_grad_scaler(trainer)
        # A GradScaler skips overflowing steps itself and lowers its scale: not our fault to count.
        check_grads = bool(grads) and not scaled
        zero = torch.zeros((), device=pl_module.device)  # where a collective can reduce it
        grad_norm = torch.nn.utils.get_total_norm(grads) if check_grads else zero
        loss = self._loss_sum if self._loss_sum is not None else zero
        self._loss_sum = None
        stats = torch.stack([loss.float(), grad_norm.float()])
        stats = all_reduce_mean(stats, trainer.world_size)  # a NaN on any rank: every rank agrees
        self._read_pending()  # the previous step's (deferred) verdict, before this one's
        if self.policy == "skip" and not scaled and _skips_on_found_inf(optimizer):
            optimizer.found_inf = (~stats.isfinite().all()).float()  # 1.0: no update at all
            self._flagged = optimizer
            self._pending = (HostCopy(stats), trainer, self._where(trainer))
        else:
            loss_value, norm_value = stats.tolist()  # a host sync
            if not self._judge(trainer, loss_value, norm_value, self._where(trainer)):
                for p in params:
                    p.grad = None  # the optimizer skips parameters without a gradient: no update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not the end of an optimizer step
        if self._flagged is not None:  # stepped: the flag must not reach another step
            del self._flagged.found_inf
            self._flagged = None
        if may_log_this_step(trainer):
            # the step's own verdict, in its row as on the synchronous path: the wait is short
            # (the stats were ready before the optimizer step) and only on logging steps
            self._read_pending()
        log_on_logging_steps(trainer, {"train/skipped_steps": float(self.skipped),
                                       "train/loss_spikes": float(self.spikes)})

    def on_train_end(self, trainer, pl_module):
        self._read_pending()  # a verdict still unread: its warning and stop reason

    def _read_pending(self) -> None:
        if self._pending is None:
            return
        stats, trainer, where = self._pending
        self._pending = None
        # a step old: done, unless the GPU is a whole step behind
        self._judge(trainer, *stats.tolist(), where)

    def _judge(self, trainer, loss_value: float, norm_value: float, where: str) -> bool:
        """Count the step's verdict; True when its loss and gradient are finite."""
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.skipped_in_row = 0
            self.last_loss = loss_value
            self._watch_spike(trainer, loss_value, where)
            return True
        what = (f"loss ({loss_value})" if not math.isfinite(loss_value)
                else f"gradient (norm {norm_value})")
        self._fault(trainer, what, where)
        return False

    def _where(self, trainer) -> str:
        step, accumulate = trainer.global_step, trainer.accumulate_grad_batches
        first, last = step * accumulate, (step + 1) * accumulate - 1
        batches = f"data batch {first}" if first == last else f"data batches {first}-{last}"
        return f"step {step} ({batches})"

    def _fault(self, trainer, what: str, where: str) -> None:
        self.skipped += 1
        self.skipped_in_row += 1
        if self.policy == "stop":
            self._stop(trainer, f"non-finite {what} at {where}; stopped without applying it "
                                f"(train.on_nonfinite=stop)")
        elif self.skipped_in_row >= self.max_skips_in_row:
            self._stop(trainer, f"{self.skipped_in_row} steps in a row had a non-finite loss or "
                                f"gradient (train.max_skips_in_row), the last a {what} at {where}")
        elif self.skipped >= self.max_skips:
            self._stop(trainer, f"{self.skipped} steps had a non-finite loss or gradient "
                                f"(train.max_skips), the last a {what} at {where}")
        else:
            _warn(trainer, f"warning: non-finite {what} at {where}: skipped its update "
                           f"({self.skipped} skipped so far)")

    def _stop(self, trainer, reason: str) -> None:
        self.stop_reason = reason
        trainer.should_stop = True

    def _watch_spike(self, trainer, loss: float, where: str) -> None:
        if (self.spike_factor > 0 and self.loss_steps >= SPIKE_WARMUP
                and loss > self.spike_factor * self.loss_mean):
            self.spikes += 1
            _warn(trainer, f"warning: loss spike at {where}: {loss:.4f} is more "
                           f"than {self.spike_factor:g} x the running mean {self.loss_mean:.4f}")
        decay = SPIKE_DECAY if self.loss_steps else 0.0
        self.loss_mean = decay * self.loss_mean + (1 - decay) * loss
        self.loss_steps += 1
