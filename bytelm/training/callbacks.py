"""Callbacks: a generated text sample after each validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from bytelm import codec
from bytelm.models.mamba_lm import generate


def sample_text(model, prompt: bytes, n_bytes: int, temperature: float, seed: int) -> str:
    """Generate n_bytes after `prompt` with the recurrent state; returns the decoded new text."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) or [codec.BOS_ID]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        new = [t.item() for t in generate(model, ids, n_bytes, temperature=temperature,
                                          generator=gen)]
    finally:
        model.train(was_training)
    return codec.decode(new)


class SampleText(L.Callback):
    """Logs a short sample after every validation (rank 0) to the console, samples.txt and W&B."""

    def __init__(self, run_dir: Path, prompt: bytes, n_bytes: int, temperature: float, seed: int):
        self.run_dir, self.prompt, self.n_bytes = Path(run_dir), prompt, n_bytes
        self.temperature, self.seed = temperature, seed
        self.last_sample: str | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero or self.n_bytes <= 0:
            return
        text = sample_text(pl_module.model, self.prompt, self.n_bytes, self.temperature, self.seed)
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
