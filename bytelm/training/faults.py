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
"""

from __future__ import annotations

import math
import sys

import lightning as L
import torch

SPIKE_WARMUP = 10  # steps of loss history before spikes are judged
SPIKE_DECAY = 0.98  # the running mean follows roughly the last 50 steps


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
        self._loss_sum: torch.Tensor | None = None  # this step's micro-batch losses, summed

    def state_dict(self) -> dict:
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
        # A GradScaler skips overflowing steps itself and lowers its scale: not our fault to count.
        check_grads = bool(grads) and getattr(trainer.precision_plugin, "scaler", None) is None
        zero = torch.zeros((), device=pl_module.device)  # where a collective can reduce it
        grad_norm = torch.nn.utils.get_total_norm(grads) if check_grads else zero
        loss = self._loss_sum if self._loss_sum is not None else zero
        self._loss_sum = None
        stats = torch.stack([loss.float(), grad_norm.float()])
        if trainer.world_size > 1:  # a NaN on any rank makes the mean NaN: every rank agrees
            stats = trainer.strategy.reduce(stats, reduce_op="mean")
        loss_value, norm_value = stats.tolist()  # the one host sync of the step
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.skipped_in_row = 0
            self._watch_spike(trainer, loss_value)
        else:
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient: no update
            what = (f"loss ({loss_value})" if not math.isfinite(loss_value)
                    else f"gradient (norm {norm_value})")
            self._fault(trainer, what)
        pl_module.log("train/skipped_steps", float(self.skipped))
        pl_module.log("train/loss_spikes", float(self.spikes))

    def _where(self, trainer) -> str:
        step, accumulate = trainer.global_step, trainer.accumulate_grad_batches
        first, last = step * accumulate, (step + 1) * accumulate - 1
        batches = f"data batch {first}" if first == last else f"data batches {first}-{last}"
        return f"step {step} ({batches})"

    def _fault(self, trainer, what: str) -> None:
        self.skipped += 1
        self.skipped_in_row += 1
        where = self._where(trainer)
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

    def _watch_spike(self, trainer, loss: float) -> None:
        if (self.spike_factor > 0 and self.loss_steps >= SPIKE_WARMUP
                and loss > self.spike_factor * self.loss_mean):
            self.spikes += 1
            _warn(trainer, f"warning: loss spike at {self._where(trainer)}: {loss:.4f} is more "
                           f"than {self.spike_factor:g} x the running mean {self.loss_mean:.4f}")
        decay = SPIKE_DECAY if self.loss_steps else 0.0
        self.loss_mean = decay * self.loss_mean + (1 - decay) * loss
        self.loss_steps += 1
