"""LightningModule: next-id loss (bytes or BPE tokens), AdamW with warmup + cosine per optimizer
step, bits per byte (summed NLL over the UTF-8 bytes the targets stand for), FLOP accounting."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from bytelm.config import ConfigError, OptimConfig
from bytelm.training import distributed
from bytelm.training.cuda_graph import GraphedLoss
from bytelm.training.datamodule import IGNORE
from bytelm.training.metrics import log_on_logging_steps
from bytelm.models.lm import LM, ModelConfig
from bytelm.tokenizer import ByteTokenizer

LN2 = math.log(2.0)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup, then cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def mark_weight_decay(model: torch.nn.Module) -> None:
    """Decide on whole parameters which ones decay (matrices and embeddings; never norms, biases,
    A_log or D) and mark each (p._no_weight_decay, as mamba_ssm marks A_log and D): FSDP turns
    them into flat 1-D shards before the optimizer is built."""
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", None) is None:
            p._no_weight_decay = p.ndim < 2 or name.rsplit(".", 1)[-1] in ("A_log", "D")


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Decay matrices and embeddings; never norms, biases, A_log or D (see mark_weight_decay)."""
    mark_weight_decay(model)  # a no-op for parameters marked while whole
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p._no_weight_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class LMTask(L.LightningModule):
    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, seq_len: int,
                 compile: bool = False, run_config: dict | None = None, tokenizer=None,
                 cuda_graph: bool = False):
        super().__init__()
        self.run_config = run_config  # stored in every checkpoint: it rebuilds the model alone
        self.model_cfg, self.optim_cfg, self.seq_len = model_cfg, optim_cfg, seq_len
        self.model = LM(model_cfg)
        mark_weight_decay(self.model)  # now, while no parameter is sharded
        self.tokenizer = tokenizer or ByteTokenizer()
        # UTF-8 bytes each id stands for: bits per byte = NLL / (ln 2 * bytes of the targets).
        self.register_buffer("token_bytes", torch.as_tensor(self.tokenizer.token_bytes),
                             persistent=False)
        self._compile = compile
        # train.cuda_graph: the training loss through a GraphedLoss, captured at the first step
        self._graphed_nll = GraphedLoss(self.nll, self.model.parameters()) if cuda_graph else None
        self.flops_per_token = self.model.flops_per_token(seq_len)
        self._val_nll = 0.0
        self._val_bytes = self._val_tokens = 0

    def on_save_checkpoint(self, checkpoint):
        checkpoint["bytelm_config"] = self.run_config
        if not self.tokenizer.is_bytes:  # the checkpoint alone can encode and decode text
            checkpoint["bytelm_tokenizer"] = self.tokenizer.to_json()

    def configure_model(self):
        # Lightning calls this once per fit/validate; compile the model only the first time.
        if self._compile and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    @property
    def flops_per_batch(self) -> int:
        """Training FLOPs of one micro-batch (3x forward)."""
        batch = self.trainer.datamodule.cfg.batch_size if self._trainer else 1
        return 3 * self.flops_per_token * self.seq_len * batch

    def nll(self, batch: torch.Tensor, reduction: str = "mean", targets=None) -> torch.Tensor:
        """Next-id NLL of windows (batch, length); `targets` (batch, length - 1) replaces
        batch[:, 1:], with IGNORE where nothing is scored."""
        inputs, targets = batch[:, :-1], batch[:, 1:] if targets is None else targets
        logits = self.model(inputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction=reduction, ignore_index=IGNORE)

    def training_step(self, batch, batch_idx):
        # NaN/inf: the NumericalGuard callback applies train.on_nonfinite
        loss = (self._graphed_nll or self.nll)(batch)
        # Logged every step, so that a row Lightning writes where a run stops never carries an
        # older step's values (it keeps the last logged one); averaged over ranks by a queued
        # all_reduce (self.log's sync_dist puts a barrier first: the host would wait for the GPU).
        world = self.trainer.world_size
        self.log("train/loss", distributed.all_reduce_mean(loss.detach(), world))
        targets = batch[:, 1:]
        bpb = loss * targets.numel() / (self.token_bytes[targets].sum() * LN2)
        self.log("train/bpb", distributed.all_reduce_mean(bpb.detach(), world))
        return loss

    def on_fit_end(self):
        # Lightning moves the model to the CPU next: the graphs' memory goes now
        if self._graphed_nll is not None:
            self._graphed_nll.release()

    def on_train_start(self):
        """Training FLOPs per byte of text, once: 3 x forward per id / bytes per id."""
        bytes_per_token = getattr(self.trainer.datamodule, "bytes_per_token", 1.0)
        if self.trainer.is_global_zero and self.global_step == 0:  # a resumed run logged it
            for logger in self.loggers:
                logger.log_metrics({"train/flops_per_byte": 3 * self.flops_per_token / bytes_per_token},
                                   step=self.global_step)

    def on_before_optimizer_step(self, optimizer):
        # Cumulative training FLOPs once this optimizer step is done (every rank, every micro-batch).
        per_step = self.flops_per_batch * self.trainer.accumulate_grad_batches * self.trainer.world_size
        # Python numbers join the step's row (self.log would copy each to the GPU, waiting for
        # it: bytelm/training/metrics.py); the lr is the one this step applies.
        flops = float((self.global_step + 1) * per_step)
        log_on_logging_steps(self.trainer, {"train/flops": flops,
                                            "train/lr": optimizer.param_groups[0]["lr"]})
        norm = distributed.grad_norm(self.parameters(), self.trainer)  # of every rank's shard
        if norm is not None:
            self.log("train/grad_norm", norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        distributed.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_validation_epoch_start(self):
        self._val_nll, self._val_bytes, self._val_tokens = 0.0, 0, 0

    def validation_step(self, batch, batch_idx):
        """batch: (windows, targets) from the datamodule's EvalWindows."""
        windows, targets = batch
        nll = self.nll(windows, reduction="sum", targets=targets)
        scored = targets != IGNORE
        self._val_nll += nll.item()
        self._val_tokens += int(scored.sum())
        self._val_bytes += int(self.token_bytes[targets.clamp(min=0)][scored].sum())

    def on_validation_epoch_end(self):
        totals = torch.tensor([self._val_nll, float(self._val_tokens), float(self._val_bytes)],
                              dtype=torch.float64, device=self.device)
        totals = self.all_gather(totals).reshape(-1, 3).sum(0) if self.trainer.world_size > 1 else totals
        nll, tokens, n_bytes = totals.tolist()
        if tokens:
            # val/loss is per id (per byte for byte models); val/bpb is per byte for every model.
            self.log("val/loss", nll / tokens, prog_bar=True, sync_dist=False, rank_zero_only=True)
            self.log("val/bpb", nll / n_bytes / LN2, prog_bar=True, sync_dist=False, rank_zero_only=True)
            self.log("val/token_ppl", math.exp(min(nll / tokens, 700.0)), sync_dist=False,
                     rank_zero_only=True)
            self.log("val/bytes", n_bytes, sync_dist=False, rank_zero_only=True)
            self.log("val/tokens", tokens, sync_dist=False, rank_zero_only=True)

    def configure_optimizers(self):
        o = self.optim_cfg
        # Fused AdamW (one kernel over all parameters) on CUDA, except under an fp16 grad scaler
        # with clipping: the gradients must be unscaled before they are clipped, which Lightning
        # does only for an unfused optimizer. Other clipping: distributed.clip_gradients.
        clip = self.trainer.gradient_clip_val
        scaled_clip = bool(clip and clip > 0) and distributed.has_grad_scaler(self.trainer)
        fused = self.device.type == "cuda" and not scaled_clip if o.fused is None else o.fused
        if fused and scaled_clip:
            raise ConfigError("optim.fused true: fp16 gradients must be unscaled before they are "
                              "clipped, which Lightning does only for an unfused optimizer "
                              "(use bf16, optim.fused false or trainer.gradient_clip_val 0)")
        opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)
        total = o.decay_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else 10_000)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o.warmup_steps, total, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
