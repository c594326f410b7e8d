"""Training on several devices and nodes: which Lightning strategy runs the loop, and the few
places where the loop must know that parameters or gradients are sharded. The model
(bytelm.models) knows nothing of this (torchtitan's split of model.py and parallelize.py).

    trainer.strategy  auto (one device, or DDP over several) | single_device | ddp | fsdp
    fsdp              FullyShardedDataParallel with one unit per residual Block; full (unsharded)
                      checkpoints written by rank 0: ordinary checkpoints that resume on any number
                      of devices and load with bytelm.checkpoint.load_checkpoint
"""

from __future__ import annotations

import difflib

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

from bytelm.config import ConfigError

SUPPORTED = ("auto", "single_device", "ddp", "fsdp")
# Spawned or forked ranks do not re-run train.py, which gives rank 0 the run directory and each
# rank its preemption handlers; Lightning's default launcher re-runs the script instead.
SPAWNED = ("ddp_spawn", "ddp_fork", "ddp_notebook")


def check_strategy(strategy) -> None:
    """A one-line ConfigError for a trainer.strategy train.py does not run. Others (DeepSpeed,
    XLA) write checkpoints as directories, which the checkpoint manifests and resume do not know."""
    if not isinstance(strategy, str) or strategy in SUPPORTED:
        return
    if strategy.startswith(SPAWNED):
        raise ConfigError(f"trainer.strategy {strategy}: train.py starts one process per device "
                          f"itself; use ddp (or fsdp), launched the same way")
    close = difflib.get_close_matches(strategy, SUPPORTED, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"trainer.strategy: {strategy!r} is not one train.py runs "
                      f"({', '.join(SUPPORTED)}){hint}")


def make_strategy(strategy):
    """`fsdp` becomes an FSDPStrategy configured for our models. `ddp`, and `auto` over several
    devices (Lightning resolves it to `ddp` by name), run CurrentStreamDDPStrategy."""
    StrategyRegistry.register("ddp", CurrentStreamDDPStrategy, "DDP built on the current stream",
                                override=True)
    return fsdp_strategy() if strategy == "fsdp" else strategy


class CurrentStreamDDPStrategy(DDPStrategy):
    """Lightning's DDP with the model wrapped on the current CUDA stream, not a side stream.

    Lightning 2.6 builds DistributedDataParallel under a new stream (for whole-step CUDA graph
    capture, which train.py does not do). DDP keeps the parameters' AccumulateGrad nodes, which
    then run on that side stream while the rest of every backward runs on the default one: each
    gradient crosses streams (torch warns "The AccumulateGrad node's stream does not match").
    On 2 H200s (125M model, benchmarks/results/multi-gpu-h200.md) this made the DDP step 3.4%
    faster (0.2099 -> 0.2028 s, foreach AdamW both). gradient_as_bucket_view: the gradients
    are views into DDP's reduction buckets, not a second copy of them (-4 bytes a parameter).
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("gradient_as_bucket_view", True)
        super().__init__(**kwargs)

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        return DistributedDataParallel(module=model, device_ids=device_ids, **self._ddp_kwargs)


def fsdp_strategy(cls=None):
    """FSDP with one unit per residual Block (`cls`: an FSDPStrategy subclass to build)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from bytelm.models.lm import Block

    return (cls or FSDPStrategy)(
        auto_wrap_policy={Block},  # each residual block gathers its parameters just in time
        state_dict_type="full",  # rank 0 writes one ordinary checkpoint through our CheckpointIO
        use_orig_params=True,  # the optimizer holds the model's own parameters (their decay marks)
        # No casts: parameters (A_log and D too) and gradient reduction stay fp32, bf16 compute
        # comes from the autocast of precision bf16-mixed, as under DDP. (Lightning would cast
        # every parameter to bf16 and reduce gradients in bf16.)
        mixed_precision=MixedPrecision(),
    )


def cluster_plugins() -> list:
    """Under SLURM, Lightning's own requeue (a SIGUSR1 handler calling scontrol) is switched off:
    our handlers checkpoint and exit 128+N, and the batch script requeues (scripts/slurm.sbatch)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def is_sharded(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def grad_norm(parameters, trainer) -> torch.Tensor | None:
    """The L2 norm of all gradients (None without any). Under FSDP each rank holds a disjoint
    shard of them: the squares are summed over ranks (a collective: every rank must call this)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else None
    if not (is_sharded(trainer) and trainer.world_size > 1):
        return norm
    if norm is None:  # no gradient in this rank's shard
        norm = torch.zeros((), device=trainer.strategy.root_device)
    return all_reduce_sum(norm.float() ** 2).sqrt()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, queued on the stream like any kernel (a copy; every rank must call
    this). Lightning's strategy.reduce puts a barrier first, which makes the host wait for the
    GPU."""
    tensor = tensor.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean over world_size ranks (equal batches: the global batch's value, as on one
    device), queued like all_reduce_sum; the tensor itself on one rank."""
    return all_reduce_sum(tensor) / world_size if world_size > 1 else tensor


def has_grad_scaler(trainer) -> bool:
    """Whether gradients arrive scaled (fp16 mixed precision) and are unscaled by Lightning."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def clip_gradients(module: L.LightningModule, optimizer, clip_val, algorithm) -> None:
    """Lightning's clipping (nothing for clip_val <= 0), done here where Lightning would refuse:
    - by norm under FSDP: the norm must cover every rank's shard, which FSDP's clip_grad_norm_
      computes;
    - without a grad scaler (not fp16): Lightning refuses any clipping with a fused optimizer
      under mixed precision, for fear of a fused step that unscales; here the gradients are the
      true ones, clipped as Lightning's Precision would (torch's clip_grad_norm_ /
      clip_grad_value_ over the optimizer's parameters).
    fp16 (a grad scaler): Lightning's, which unscales first (its optimizer is never fused)."""
    if not clip_val or clip_val <= 0:
        return
    by_value = algorithm == "value"  # GradClipAlgorithmType is a str enum
    if is_sharded(module.trainer) and not by_value:
        module.trainer.strategy.model.clip_grad_norm_(clip_val)
    elif has_grad_scaler(module.trainer):
        module.clip_gradients(optimizer, clip_val, algorithm)
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if by_value:
            torch.nn.utils.clip_grad_value_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_val)


def whole_model(trainer, model: torch.nn.Module) -> torch.nn.Module | None:
    """`model` with all its parameters, for work outside forward (generation): itself unless
    sharded; under FSDP an unsharded copy on rank 0 and None elsewhere. A collective under FSDP
    (every rank must call it): FSDP allows no forward inside summon_full_params, hence a copy."""
    if not is_sharded(trainer):
        return model
    state = trainer.strategy.lightning_module_state_dict()  # gathered on rank 0 only
    if not trainer.is_global_zero:
        return None
    prefix = next(name for name, module in trainer.lightning_module.named_children()
                  if module is model) + "."
    with torch.device("meta"):  # no initialisation: it would also draw from the global RNG
        copy = type(model)(model.cfg)
    copy.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                          if k.startswith(prefix)}, assign=True)
    return copy.to(trainer.strategy.root_device)


class GlobalBatch(L.Callback):
    """Prints the global batch once at the start and logs it (train/global_batch_size in windows,
    train/global_batch_bytes: the bytes its targets cover, a mean for token models)."""

    def __init__(self, batch_size: int, seq_len: int, bytes_per_token: float):
        self.batch_size, self.seq_len, self.bytes_per_token = batch_size, seq_len, bytes_per_token

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        windows = self.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        n_bytes = windows * self.seq_len * self.bytes_per_token
        approx = "" if self.bytes_per_token == 1 else "about "
        print(f"global batch: {self.batch_size} windows x {trainer.accumulate_grad_batches} "
              f"accumulated x {trainer.world_size} devices = {windows} windows of {self.seq_len} = "
              f"{approx}{round(n_bytes):,} bytes per optimizer step", flush=True)
        if trainer.global_step == 0:  # a resumed run logged it already
            for logger in trainer.loggers:
                logger.log_metrics({"train/global_batch_size": windows,
                                    "train/global_batch_bytes": n_bytes}, step=0)
