"""Byte-level Mamba language model: embedding, N x (RMSNorm -> Mamba mixer) residual blocks,
final norm, tied LM head. Imports nothing from Lightning."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bytelm import codec
from bytelm.modules.mamba import MambaMixer, MambaState
from bytelm.modules.norm import RMSNorm


@dataclass
class MambaConfig:
    d_model: int = 256
    n_layer: int = 4
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    vocab_size: int = codec.VOCAB_SIZE
    pad_vocab_multiple: int = 8
    norm_eps: float = 1e-5
    scan_backend: str = "auto"  # auto | ref | naive | triton

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m


class Block(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaMixer(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                expand=cfg.expand, dt_rank=cfg.dt_rank, dt_min=cfg.dt_min,
                                dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
                                scan_backend=cfg.scan_backend)

    def forward(self, x, return_state=False):
        if not return_state:
            return x + self.mixer(self.norm(x))
        y, state = self.mixer(self.norm(x), return_state=True)
        return x + y, state

    def step(self, x, state: MambaState):
        return x + self.mixer.step(self.norm(x), state)


class MambaLM(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self._init_weights()

    def _init_weights(self):
        """mamba_ssm's scheme: N(0, 0.02) embeddings, zero linear biases (except dt_proj's),
        and out_proj scaled by 1/sqrt(n_layer) so the residual stream does not grow with depth."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            if name.endswith("out_proj"):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.weight /= math.sqrt(self.cfg.n_layer)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (batch, length) int64 -> logits (batch, length, padded_vocab)."""
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.norm_f(x), self.embedding.weight)

    # ---- recurrent inference -------------------------------------------------------------
    def init_state(self, batch: int, device=None, dtype=None) -> list[MambaState]:
        return [layer.mixer.init_state(batch, device, dtype) for layer in self.layers]

    def prefill(self, input_ids: torch.Tensor):
        """Parallel forward over a prompt that also returns the recurrent state after it.
        input_ids: (batch, length) -> logits of the last position (batch, vocab), states."""
        x = self.embedding(input_ids)
        states = []
        for layer in self.layers:
            x, state = layer(x, return_state=True)
            states.append(state)
        return F.linear(self.norm_f(x[:, -1]), self.embedding.weight), states

    def step(self, input_ids: torch.Tensor, states: list[MambaState]) -> torch.Tensor:
        """One byte per sequence. input_ids: (batch,) -> logits (batch, vocab); states in place."""
        x = self.embedding(input_ids)
        for layer, state in zip(self.layers, states):
            x = layer.step(x, state)
        return F.linear(self.norm_f(x), self.embedding.weight)

    # ---- accounting ----------------------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token by formula: 2 x every matmul weight (the tied head included)
        plus each mixer's conv and scan element-wise work. Training is 3x this."""
        matmul = 0
        for module in self.modules():
            if isinstance(module, nn.Linear):
                matmul += module.weight.numel()
        matmul += self.embedding.weight.numel()  # the tied LM head
        extra = sum(layer.mixer.flops_per_token() for layer in self.layers)
        return 2 * matmul + extra

    def config_dict(self) -> dict:
        return asdict(self.cfg)


@torch.no_grad()
def generate(model: MambaLM, prompt_ids: torch.Tensor, max_new_bytes: int, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None):
    """Sample a continuation byte by byte with the recurrent state (O(1) per byte).
    prompt_ids: (batch, length >= 1). Yields (batch,) tensors of new byte ids."""
    logits, states = model.prefill(prompt_ids)
    for _ in range(max_new_bytes):
        next_ids = sample_next(logits, temperature, top_p, generator)
        yield next_ids
        logits = model.step(next_ids, states)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Byte ids only (specials and padding never sampled); temperature 0 is greedy."""
    logits = logits[:, :256].float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
