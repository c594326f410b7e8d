"""Callbacks: a generated text sample after each validation; a validation of the last step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from bytelm.data.prepare import DOC_SEP
from bytelm.models.lm import generate
from bytelm.tokenizer import ByteTokenizer
from bytelm.training.distributed import whole_model


def sample_text(model, prompt: bytes, n_bytes: int, temperature: float, seed: int,
                tokenizer=None) -> str:
    """Generate about n_bytes of text after `prompt` (a byte model: exactly n_bytes) with the
    incremental state; returns the decoded new text. An empty prompt starts a document."""
    tokenizer = tokenizer or ByteTokenizer()
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode_bytes(prompt or bytes([DOC_SEP]))], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab_limit = 256 if tokenizer.is_bytes else tokenizer.vocab_size
    was_training = model.training
    model.eval()
    new, new_bytes = [], 0
    try:
        # Steps from a CUDA graph where use_graph says it pays (CUDA, no attention, 32 steps
        # or more): at batch 1 an eager step is the host launching kernels. The 34-layer
        # tiny-Shakespeare config's run, six 500-byte samples: 112.9 -> 48.2 s on an H200
        # (benchmarks/results/tinyshakespeare-h200.md).
        for t in generate(model, ids, n_bytes, temperature=temperature, generator=gen,
                          vocab_limit=vocab_limit, cuda_graph=None):
            new.append(t.item())
            new_bytes += int(tokenizer.token_bytes[new[-1]])
            if new_bytes >= n_bytes:
                break
    finally:
        model.train(was_training)
    return tokenizer.decode(new)


class SampleText(L.Callback):
    """Logs a short sample after every validation (rank 0) to the console, samples.txt and W&B."""

    def __init__(self, run_dir: Path, prompt: bytes, n_bytes: int, temperature: float, seed: int):
        self.run_dir, self.prompt, self.n_bytes = Path(run_dir), prompt, n_bytes
        self.temperature, self.seed = temperature, seed
        self.last_sample: str | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.n_bytes <= 0:
            return
        model = whole_model(trainer, pl_module.model)  # every rank: FSDP gathers it on rank 0
        if not trainer.is_global_zero:
            return
        text = sample_text(model, self.prompt, self.n_bytes, self.temperature, self.seed,
                           getattr(pl_module, "tokenizer", None))
        self.last_sample = text
        step = trainer.global_step
        prompt = self.prompt.decode("utf-8", errors="replace")
        with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {step} ===\n{prompt}{text}\n\n")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_text("samples", columns=["step", "prompt", "sample"],
                                data=[[step, prompt, text]], step=step)
            elif type(logger).__name__ == "TensorBoardLogger":
                logger.experiment.add_text("sample", prompt + text, step)


class ValidateLastStep(L.Callback):
    """The final model is always scored: the run is asked to stop at its last step, which makes
    Lightning validate inside fit when that step is not a validation step anyway (once when it
    is), and write that step's row of metrics whatever log_every_n_steps says. (A
    trainer.validate after fit would wrap an FSDP model a second time, around parameters left
    sharded.)"""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not the end of an optimizer step
        step = trainer.global_step
        if 0 < trainer.max_steps <= step:
            trainer.should_stop = True
